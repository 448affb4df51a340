//! Safe trait impls and call sequences an embedder may write that once broke a `// SAFETY:`
//! argument of the core, lost a remote TLB flush, or panicked on bad input (a public-API review,
//! session 52): each test failed before its fix.
#![cfg(not(loom))]

use std::sync::mpsc;
use vmmu::memslot::{
    Memslot, MemslotHooks, Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use vmmu::{AsId, Generation, SlotId};

// ---------------------------------------------------------------------------------------------
// 1. `MemslotHooks` is a safe trait, so `Memslots::set_memory_region` must not trust `publish`
//    to run the closure it is given: a hook that did not left the old set published, and the
//    swap's `unsafe { was_active.replace(..) }` then edited the set readers were reading. The
//    swap now publishes itself when the hook did not.

/// Hooks that never run the publication (a safe impl: the trait does not say it must) and that
/// let a reader open a section at the `memslots_updated` step (after the grace period, before
/// the second `replace`), as any vCPU thread may at that instant.
struct SkipsPublish {
    go: mpsc::Sender<()>,
    ack: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl MemslotHooks for SkipsPublish {
    fn flush_slot(&self, _old: &Memslot) {}
    fn memslots_updated(&self, _as_id: AsId, _new_gen: Generation) {
        // Stand-in for "a vCPU's read section begins now": let the reader in, and wait until it
        // holds a reference into the published set.
        self.go.send(()).unwrap();
        self.ack.lock().unwrap().recv().unwrap();
    }
    fn publish(&self, _publish: &mut dyn FnMut()) {
        // Forgets to call `_publish()`.
    }
}

#[test]
fn a_hook_that_skips_publish_makes_an_update_edit_the_set_a_reader_holds() {
    let m = Memslots::new(MemslotsConfig { nr_address_spaces: 1, ..Default::default() });
    let reader = m.register_reader().unwrap();
    let region = |flags| UserspaceMemoryRegion::new(0, flags, 0, 0x10_000, 0x7000_0000);
    m.set_memory_region(&region(0), &NoHooks).unwrap();

    let (go_tx, go_rx) = mpsc::channel();
    let (ack_tx, ack_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let hooks = SkipsPublish { go: go_tx, ack: std::sync::Mutex::new(ack_rx) };
    let (before, after) = std::thread::scope(|s| {
        let m = &m;
        let r = s.spawn(move || {
            go_rx.recv().unwrap();
            let guard = m.read(&reader);
            let slot: &Memslot = guard.set(AsId(0)).get(SlotId(0)).unwrap();
            // SAFETY: `slot` is a live shared reference into the set the open read section
            // protects, so it is valid and aligned for a read.
            let before = unsafe { std::ptr::read_volatile(slot) }.flags();
            ack_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            // SAFETY: as above; the section is still open.
            let after = unsafe { std::ptr::read_volatile(slot) }.flags();
            drop(guard);
            (before, after)
        });
        // A flags-only change (dirty logging on): the swap overwrites slot 0's entry in place.
        m.set_memory_region(&region(KVM_MEM_LOG_DIRTY_PAGES), &hooks).unwrap();
        done_tx.send(()).unwrap();
        r.join().unwrap()
    });
    assert_eq!(
        before, after,
        "a memslot update edited the set a reader is reading: the `&Memslot` it holds inside \
         its read section changed from flags {before:#x} to {after:#x} (MemslotSet::replace's \
         precondition broken by a safe MemslotHooks::publish that did not publish)"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A host callback that panics under the shadow lock after the fault's
//    `make_pages_available` recycled pages (`ShadowMmu::install_fault`, `ShadowVcpu::service`)
//    unwinds past `commit_zap`. The prepared pages and the owed flush were on the caller's
//    stack and were lost with it: the remote TLB flush the zap needed was never requested and
//    the zapped pages' frames were never freed (not even when the VM went). They are now kept
//    in the shadow state for the next commit. `Sched::preempt_point` here;
//    `FrameAllocator::alloc_table` and `GuestMemory::read_u64`, which run at the same place and
//    which the crate says may panic, did the same.

mod common;

use common::shadow::{access, long4, shadow_vm_with, vcpu_in, Seen, Space, P, RW, US};
use vmmu::host::PreemptPoint;

/// Vcpu B maps gva 0 (its TLB may now hold it) and goes on outside guest mode; vCPU A fills
/// the page limit with paths of its own until its next fault must recycle, and that fault's
/// `preempt_point(FaultInstalled)` panics if `panic`. Returns whether B was asked to flush its
/// TLB by the time A's fault returned (or unwound), whether gva 0's shadow path survived, and the
/// table frames left in use once the VM and its vCPUs are dropped.
fn recycle_under_a_panicking_callback(panic: bool) -> (bool, bool, u64) {
    let (vm, host, next) = shadow_vm_with(|c| c.shadow_max_pages = Some(64));
    let s = Space::new(&host, &next);
    let gva = |i: u64| i << 39; // a PDPT, a PD and a PT of its own per gva
    for i in 0..64 {
        s.map4k(gva(i), 0x100_0000 + (i << 12), P | RW | US);
    }
    let mut b = vcpu_in(&vm, long4(s.cr3));
    let mut a = vcpu_in(&vm, long4(s.cr3));
    assert!(matches!(access(&mut b, gva(0), false), Seen::Ram(_)));
    let shadow = vm.shadow_mmu().unwrap();
    let mut i = 1;
    while shadow.pages_in_use() + 5 <= 64 {
        assert!(matches!(access(&mut a, gva(i), false), Seen::Ram(_)));
        i += 1;
    }
    assert!(!b.requests_pending(), "setup: nothing asked of B yet");
    let recycled = shadow.stats.snapshot().mmu_recycled;
    if panic {
        vmmu::testing::preempt::on_this_thread(Some(Box::new(|p| {
            if p == PreemptPoint::FaultInstalled {
                panic!("host callback panics under the shadow lock");
            }
        })));
    }
    let r =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| access(&mut a, gva(i), false)));
    vmmu::testing::preempt::on_this_thread(None);
    assert_eq!(r.is_err(), panic);
    assert!(shadow.stats.snapshot().mmu_recycled > recycled, "setup: A's fault recycled pages");
    let b_asked_to_flush = b.requests_pending();
    let path_kept =
        matches!(common::shadow::hw(&mut b, gva(0), false), vmmu::tdp::HwWalk::Translated { .. });
    drop((a, b));
    drop(vm);
    (b_asked_to_flush, path_kept, host.tables_in_use())
}

#[test]
fn a_callback_panic_after_recycling_leaks_the_zapped_pages_past_the_vms_drop() {
    // Without the panic: B's path was recycled, B is asked to flush, everything is freed.
    let (flush, kept, left) = recycle_under_a_panicking_callback(false);
    assert!(!kept && flush && left == 0, "control run: flush {flush}, kept {kept}, left {left}");
    // With it: the same pages were zapped (B's path is gone). Here `fetch` flushed before the
    // panic (its first gPTE re-check flushes the batch); the root-load test below shows a
    // panic that comes before any flush.
    let (flush, kept, left) = recycle_under_a_panicking_callback(true);
    assert!(!kept && flush, "B's shadow path to gva 0 was recycled by A's fault and flushed");
    assert_eq!(
        left, 0,
        "table frames of the recycled shadow pages were never given back, not even when the VM \
         was dropped (the ZapBatch holding them was dropped uncommitted by the unwind)"
    );
}

/// The test host, with an `alloc_table` (and an `alloc_table_below_4g`) that panics once when
/// armed (a host bug, which the crate says unwinds out of the fault and leaves the VM usable).
struct PanicAlloc {
    inner: Arc<vmmu::testing::TestHost>,
    /// 0: off; n: the n-th `alloc_table` from now panics.
    armed: std::sync::atomic::AtomicUsize,
    armed_low: std::sync::atomic::AtomicBool,
}

impl PanicAlloc {
    /// A shadow VM (at most `max_pages` shadow pages) over the test host, with common::shadow's
    /// RAM slot.
    fn shadow_vm(max_pages: Option<usize>) -> (vmmu::vm::Vm<PanicAlloc>, Arc<PanicAlloc>) {
        use vmmu::vm::{Vm, VmConfig};
        let inner = Arc::new(vmmu::testing::TestHost::new(2048));
        inner.map(
            common::shadow::RAM_HVA,
            common::shadow::RAM_SIZE,
            common::shadow::RAM_HVA >> 12,
            vmmu::Level::L4K,
            true,
        );
        let host = Arc::new(PanicAlloc { inner, armed: 0.into(), armed_low: false.into() });
        let mut cfg = VmConfig::shadow(46).unwrap();
        cfg.max_vcpus = 2;
        cfg.shadow_max_pages = max_pages;
        let vm = Vm::new(cfg, host.clone()).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(
            0,
            0,
            0,
            common::shadow::RAM_SIZE,
            common::shadow::RAM_HVA,
        ))
        .unwrap();
        (vm, host)
    }
}

use std::sync::Arc;
use vmmu::host::{FrameAllocator, GuestMemory, HostAccess, HostFault, HostMemory, HostPage};
use vmmu::{Hva, Pfn};

// SAFETY: every frame call is the test host's (whose impl makes the promises), or a panic.
unsafe impl FrameAllocator for PanicAlloc {
    fn retains_table_memory(&self) -> bool {
        self.inner.retains_table_memory()
    }
    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        let sync = std::sync::atomic::Ordering::SeqCst;
        if self.armed.fetch_update(sync, sync, |n| n.checked_sub(1)) == Ok(1) {
            panic!("host bug in alloc_table");
        }
        self.inner.alloc_table(init)
    }
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
        if self.armed_low.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("host bug in alloc_table_below_4g");
        }
        self.inner.alloc_table_below_4g(init)
    }
    unsafe fn free_table(&self, pfn: Pfn) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.free_table(pfn) }
    }
    fn table(&self, pfn: Pfn) -> Option<std::ptr::NonNull<vmmu::host::TableEntries>> {
        self.inner.table(pfn)
    }
}
impl HostMemory for PanicAlloc {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        self.inner.translate(hva, access)
    }
}
impl GuestMemory for PanicAlloc {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        self.inner.read_u64(hva)
    }
    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        self.inner.cmpxchg_u64(hva, old, new)
    }
}
impl vmmu::host::Sched for PanicAlloc {}

/// A user read of `gva` as the hardware and the hypervisor do it (`common::shadow::access` for
/// any host): the frame it reaches.
fn read_gva<H: vmmu::host::Host + GuestMemory>(v: &mut vmmu::vcpu::Vcpu<H>, gva: u64) -> Pfn {
    use vmmu::fault::{FaultOutcome, PfErr};
    for _ in 0..50 {
        v.service_requests().unwrap();
        if v.enter_guest_mode().is_err() {
            continue;
        }
        let walk = v.walk_gva(vmmu::Gva(gva), vmmu::Access::USER);
        v.exit_guest_mode();
        let err = match walk {
            vmmu::tdp::HwWalk::Translated { pfn, .. } => return pfn,
            vmmu::tdp::HwWalk::Violation { present, .. } => {
                PfErr::USER | if present { PfErr::PRESENT } else { 0 }
            }
            w => panic!("{w:?}"),
        };
        match v.handle_page_fault(vmmu::Gva(gva), PfErr(err)).unwrap() {
            FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
            o => panic!("{o:?}"),
        }
    }
    panic!("no translation for {gva:#x}");
}

/// vCPU B reads gva 0 through the shadow (its TLB may now hold the translation) and stays out of
/// guest mode. vCPU A fills the page limit, switches CR3 and loads a root: the root load
/// recycles B's path (`make_pages_available`), then its `alloc_table` panics. The zap cleared a
/// present SPTE B may have walked, so B must be asked to flush (`request_all(TlbFlush)`), as
/// without the panic.
#[test]
fn a_panicking_alloc_table_in_a_root_load_after_recycling_loses_the_remote_flush() {
    let run = |panic: bool| -> (bool, bool) {
        let (vm, host) = PanicAlloc::shadow_vm(Some(64));
        let inner = host.inner.clone();
        let next = std::rc::Rc::new(std::cell::Cell::new(common::shadow::TABLES_GPA));
        let s1 = Space::new(&inner, &next);
        let s2 = Space::new(&inner, &next);
        let gva = |i: u64| i << 39;
        for i in 0..64 {
            s1.map4k(gva(i), 0x100_0000 + (i << 12), P | RW | US);
        }
        s2.map4k(gva(0), 0x100_0000, P | RW | US);
        let new_vcpu = || {
            let mut v = vm.create_vcpu().unwrap();
            v.set_guest_cpu(long4(s1.cr3)).unwrap();
            v
        };
        let (mut b, mut a) = (new_vcpu(), new_vcpu());
        read_gva(&mut b, gva(0));
        let shadow = vm.shadow_mmu().unwrap();
        let mut i = 1;
        while shadow.pages_in_use() + 5 <= 64 {
            read_gva(&mut a, gva(i));
            i += 1;
        }
        assert!(!b.requests_pending(), "setup: nothing asked of B yet");
        let recycled = shadow.stats.snapshot().mmu_recycled;
        a.load_cr3(s2.cr3).unwrap();
        host.armed.store(usize::from(panic), std::sync::atomic::Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.service_requests()));
        assert_eq!(r.is_err(), panic, "{r:?}");
        assert!(shadow.stats.snapshot().mmu_recycled > recycled, "setup: the root load recycled");
        let asked = b.requests_pending();
        // The host then takes the page back (munmap, migration): its invalidation zaps what
        // maps it and flushes the vCPUs that may cache it, as the rmap knows them.
        let inv = vm.invalidate_hva_range_begin(
            Hva(common::shadow::RAM_HVA + 0x100_0000),
            Hva(common::shadow::RAM_HVA + 0x100_1000),
        );
        let asked_by_invalidation = b.requests_pending();
        drop(inv);
        b.service_requests().unwrap();
        b.enter_guest_mode().unwrap_or_else(|_| panic!("B has requests"));
        let kept = matches!(
            b.walk_gva(vmmu::Gva(gva(0)), vmmu::Access::USER),
            vmmu::tdp::HwWalk::Translated { .. }
        );
        b.exit_guest_mode();
        (asked || asked_by_invalidation, kept)
    };
    let (asked, kept) = run(false);
    assert!(
        asked && !kept,
        "control run: B's path recycled and B asked to flush ({asked}, {kept})"
    );
    let (asked, kept) = run(true);
    assert!(!kept, "B's shadow path to gva 0 was recycled");
    assert!(
        asked,
        "a root load recycled the shadow path vCPU B walked, then the host's alloc_table \
         panicked before the batch's commit: B was never asked to flush its TLB, not even by \
         the host's invalidation of the page (the rmap forgot the leaf)"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. `Memslots::try_new` promises the configuration error instead of a panic; it did not check
//    `max_readers`, and the SRCU domain allocates one 64-byte record per reader up front
//    (`Vm::new` bounds its count with `KVM_MAX_VCPUS`). Now `ConfigError::TooManyReaders`.

#[test]
fn memslots_try_new_with_a_huge_reader_count_is_an_error_not_a_panic() {
    let cfg = MemslotsConfig { max_readers: usize::MAX, ..Default::default() };
    let r = std::panic::catch_unwind(|| Memslots::try_new(cfg).map(|_| ()));
    assert!(r.is_ok(), "Memslots::try_new panicked on max_readers = usize::MAX");
}

// ---------------------------------------------------------------------------------------------
// 4. `DirtyBitmap::mark` (public, reached through `MemslotSet::dirty_bitmap`) checked its page
//    index only in a debug assertion: past `npages` it panicked in debug builds and, in release
//    builds, set a bit past the slot's last page in the last word, which the next
//    `KVM_GET_DIRTY_LOG` returned as a dirty page the slot does not have. Now it marks nothing.

#[test]
fn dirty_bitmap_mark_past_the_slot_is_ignored_not_a_panic() {
    let m = Memslots::new(MemslotsConfig { nr_address_spaces: 1, ..Default::default() });
    let r = m.register_reader().unwrap();
    m.set_memory_region(
        &UserspaceMemoryRegion::new(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 0x1000, 0x7000_0000),
        &NoHooks,
    )
    .unwrap();
    let g = m.read(&r);
    let bitmap = g.set(AsId(0)).dirty_bitmap(SlotId(0)).unwrap();
    assert_eq!(bitmap.npages(), 1);
    let marked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bitmap.mark(5)));
    assert!(marked.is_ok(), "DirtyBitmap::mark(5) on a 1-page bitmap panicked");
    assert_eq!(bitmap.snapshot(), vec![0], "a page past the slot was marked dirty");
}

// ---------------------------------------------------------------------------------------------
// 5. The free queue's promises (`mmu_core/free_queue.rs`: one per live shadow page and per
//    vCPU's PAE root frame) were made before the host's `alloc_table` / `alloc_table_below_4g`:
//    a host callback that unwound there kept the promise with no frame behind it, so each such
//    panic reserved queue room for the VM's life. They are now made after the allocation.

#[test]
fn a_panicking_table_allocation_leaves_no_free_queue_promise_behind() {
    use vmmu::guest::{GuestCpu, PagingMode};
    let (vm, host) = PanicAlloc::shadow_vm(None);
    let next = std::rc::Rc::new(std::cell::Cell::new(common::shadow::TABLES_GPA));
    let s = Space::new(&host.inner, &next);
    s.map4k(0, 0x100_0000, P | RW | US);
    s.map4k(1 << 39, 0x100_1000, P | RW | US);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(long4(s.cr3)).unwrap();
    read_gva(&mut v, 0);
    let shadow = vm.shadow_mmu().unwrap();
    let promises = || vm.core().free_queue_promises();
    assert_eq!(promises(), shadow.pages_in_use(), "setup: one promise per page");
    let sync = std::sync::atomic::Ordering::SeqCst;
    // The fault for gva 1 << 39 needs a new PDPT page: the host's alloc_table panics.
    host.armed.store(1, sync);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_gva(&mut v, 1 << 39)));
    assert!(r.is_err(), "setup: the host panicked");
    assert_eq!(promises(), shadow.pages_in_use(), "a panicking alloc_table left a promise");
    // A PAE guest's first root load: the host's alloc_table_below_4g panics.
    let mut w = vm.create_vcpu().unwrap();
    w.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    w.load_cr3(0x20_0000).unwrap();
    host.armed_low.store(true, sync);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.service_requests()));
    assert!(r.is_err(), "setup: the host panicked");
    assert_eq!(
        promises(),
        shadow.pages_in_use(),
        "a panicking alloc_table_below_4g left a promise (no vCPU holds a PAE root frame)"
    );
    // The VM goes on: both vCPUs reach their pages.
    read_gva(&mut v, 1 << 39);
    w.service_requests().unwrap();
    assert_eq!(promises(), shadow.pages_in_use() + 1, "w's PAE root frame holds one");
}

// ---------------------------------------------------------------------------------------------
// 6. A special root (a PAE guest's) pinned each level-2 page as it got it: a host
//    `alloc_table` that panicked for a later page left the earlier ones pinned by a root that
//    never existed, so they were never freed, not by a zap-all nor by the VM's drop, and still
//    counted against the page limit. The pages are now all got before any is pinned.

#[test]
fn a_panic_while_building_a_special_root_leaves_no_page_pinned() {
    use vmmu::guest::{GuestCpu, PagingMode};
    let (vm, host) = PanicAlloc::shadow_vm(None);
    let next = std::rc::Rc::new(std::cell::Cell::new(common::shadow::TABLES_GPA));
    // A PDPT whose four PDPTEs name four page directories (all empty).
    let pdpt = common::shadow::alloc_table(&next);
    for i in 0..4 {
        let pd = common::shadow::alloc_table(&next);
        host.inner.write_u64(common::shadow::RAM_HVA + pdpt + 8 * i, pd | P);
    }
    let mut w = vm.create_vcpu().unwrap();
    w.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    w.load_cr3(pdpt).unwrap();
    // The root's second level-2 page: the host panics.
    host.armed.store(2, std::sync::atomic::Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.service_requests()));
    assert!(r.is_err(), "setup: the host panicked");
    w.service_requests().unwrap();
    let shadow = vm.shadow_mmu().unwrap();
    assert_eq!(shadow.pages_in_use(), 4, "the root's four level-2 pages");
    drop(w);
    vm.zap_all_fast();
    assert_eq!(
        shadow.pages_in_use(),
        0,
        "a page the unwound root build pinned is still held after its vCPU went and a zap-all"
    );
}
