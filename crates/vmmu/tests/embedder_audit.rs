//! An outside embedder's audit of the public API (embed45): an own host (frame pool, host memory
//! with knobs for misbehaving, guest memory for shadow paging), several VMs and vCPU threads,
//! memslot changes with edge values, host invalidations, dirty logging, odd drop orders, and
//! host callbacks that call back into the VM. Only the public API is used (no `vmmu::testing`).
//!
//! Hangs are detected with [`within`]: a call that does not return in time is a deadlock (the
//! thread is left behind; the test fails).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64 as StdAtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use vmmu::fault::{FaultOutcome, PfErr};
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::host::{
    FrameAllocator, GuestMemory, HostAccess, HostFault, HostMemory, HostPage, Sched, TableEntries,
};
use vmmu::memslot::{UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES};
use vmmu::spte::FormatKind;
use vmmu::sync::{Arc, AtomicU64};
use vmmu::tdp::HwWalk;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa, Gva, Hva, Level, Pfn, SlotId};

/// Host frames of guest RAM start here; table pages at `POOL_BASE_PFN` (below 4 GiB, so PAE
/// special roots can be allocated).
const RAM_BASE_PFN: u64 = 0x1000;
const POOL_BASE_PFN: u64 = 0x8_0000;
/// Host frames of guest RAM pages whose copy-on-write was broken (`AuditHost::copied`).
const COPY_BASE_PFN: u64 = 0x4_0000;
/// The host-virtual address of guest RAM (fake: translation is the host's own business).
const RAM_HVA: u64 = 0x7f00_0000_0000;
/// Guest RAM: 4 MiB.
const RAM_BYTES: u64 = 4 << 20;

type Hook = Box<dyn Fn(Hva) + Send + Sync>;
type TranslateHook = Box<dyn Fn(Hva, HostAccess) + Send + Sync>;

struct AuditHost {
    pool: Box<[TableEntries]>,
    live: Box<[AtomicBool]>,
    free: Mutex<Vec<usize>>,
    /// Guest RAM as 8-byte words (the shadow MMU reads guest tables through `GuestMemory`).
    ram: Box<[StdAtomicU64]>,
    /// Called at the start of every `translate` (re-entrancy experiments).
    translate_hook: OnceLock<TranslateHook>,
    /// Called at the start of every `read_u64`.
    read_hook: OnceLock<Hook>,
    /// Called at the start of every `cmpxchg_u64` (with `HostAccess::Write`).
    cmpxchg_hook: OnceLock<TranslateHook>,
    /// Called at the start of every `alloc_table` (with the frame about to be handed out).
    alloc_hook: OnceLock<Hook>,
    /// Each `translate` names another frame for the same page (an inconsistent host).
    inconsistent: AtomicBool,
    /// Guest RAM pages (by offset from `RAM_HVA`, in pages) shared copy-on-write: `translate`
    /// names their first frame read-only until they are in `copied`.
    cow: Mutex<Vec<u64>>,
    /// Pages whose copy-on-write was broken: `translate` names their copy, `COPY_BASE_PFN` +
    /// page, writable.
    copied: Mutex<Vec<u64>>,
    calls: AtomicUsize,
    /// Declared type-stable (`FrameAllocator::type_stable_tables`): the pool keeps freed pages
    /// and reuses them only as table pages, and every store this host makes into one is Release.
    type_stable: bool,
}

impl AuditHost {
    fn new(pages: usize) -> Arc<Self> {
        Self::with(pages, false)
    }

    fn with(pages: usize, type_stable: bool) -> Arc<Self> {
        Arc::new(AuditHost {
            type_stable,
            pool: (0..pages).map(|_| std::array::from_fn(|_| AtomicU64::new(0))).collect(),
            live: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            free: Mutex::new((0..pages).rev().collect()),
            ram: (0..RAM_BYTES / 8).map(|_| StdAtomicU64::new(0)).collect(),
            translate_hook: OnceLock::new(),
            read_hook: OnceLock::new(),
            cmpxchg_hook: OnceLock::new(),
            alloc_hook: OnceLock::new(),
            inconsistent: AtomicBool::new(false),
            cow: Mutex::new(Vec::new()),
            copied: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
        })
    }

    fn word(&self, hva: Hva) -> Result<&StdAtomicU64, HostFault> {
        let off = hva.raw().checked_sub(RAM_HVA).ok_or(HostFault::Unmapped(hva))?;
        self.ram.get((off / 8) as usize).ok_or(HostFault::Unmapped(hva))
    }

    /// Writes guest-physical `gpa` (slot 0 maps gpa 0 at `RAM_HVA`).
    fn write_gpa(&self, gpa: u64, val: u64) {
        self.ram[(gpa / 8) as usize].store(val, Ordering::SeqCst);
    }
}

// SAFETY: pool pages live in a boxed slice as long as the host and never move; a page is handed
// out from the free list only (never twice while live) and initialised before `alloc_table`
// returns; `table` answers `None` for frames outside the pool or not live. Guest RAM (`ram`)
// is a separate buffer: no translation names a pool frame. Nothing but the MMU stores into a
// live table page.
unsafe impl FrameAllocator for AuditHost {
    fn type_stable_tables(&self) -> bool {
        self.type_stable
    }

    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        if let Some(hook) = self.alloc_hook.get() {
            hook(Hva(0));
        }
        let i = self.free.lock().ok()?.pop()?;
        for e in self.pool[i].iter() {
            e.store(init, Ordering::Release);
        }
        self.live[i].store(true, Ordering::Release);
        Some(Pfn(POOL_BASE_PFN + i as u64))
    }

    unsafe fn free_table(&self, pfn: Pfn) {
        let i = (pfn.raw() - POOL_BASE_PFN) as usize;
        assert!(self.live[i].swap(false, Ordering::AcqRel), "double free of {pfn:?}");
        self.free.lock().unwrap().push(i);
    }

    fn table(&self, pfn: Pfn) -> Option<NonNull<TableEntries>> {
        let i = usize::try_from(pfn.raw().checked_sub(POOL_BASE_PFN)?).ok()?;
        let page = self.pool.get(i)?;
        self.live.get(i)?.load(Ordering::Acquire).then(|| NonNull::from(page))
    }
}

impl HostMemory for AuditHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        if let Some(hook) = self.translate_hook.get() {
            hook(hva, access);
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed) as u64;
        let off = hva.raw().checked_sub(RAM_HVA).filter(|&o| o < RAM_BYTES);
        let Some(off) = off else { return Err(HostFault::Unmapped(hva)) };
        let mut pfn = RAM_BASE_PFN + (off >> 12);
        let mut writable = true;
        if self.copied.lock().unwrap().contains(&(off >> 12)) {
            pfn = COPY_BASE_PFN + (off >> 12);
        } else if self.cow.lock().unwrap().contains(&(off >> 12)) {
            writable = false;
        }
        if self.inconsistent.load(Ordering::Relaxed) {
            // Another frame each time, and a level the frame cannot honour.
            pfn = RAM_BASE_PFN + (n % 1024);
            return Ok(HostPage { pfn: Pfn(pfn), writable: n % 2 == 0, level: Level::L1G });
        }
        Ok(HostPage { pfn: Pfn(pfn), writable, level: Level::L4K })
    }
}

impl GuestMemory for AuditHost {
    fn read_u64(&self, hva: Hva) -> Result<u64, HostFault> {
        if let Some(hook) = self.read_hook.get() {
            hook(hva);
        }
        Ok(self.word(hva)?.load(Ordering::SeqCst))
    }

    fn cmpxchg_u64(&self, hva: Hva, old: u64, new: u64) -> Result<bool, HostFault> {
        if let Some(hook) = self.cmpxchg_hook.get() {
            hook(hva, HostAccess::Write);
        }
        Ok(self.word(hva)?.compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }
}

impl Sched for AuditHost {}

/// Runs `f` on a thread; `None` if it did not finish within `secs` (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

fn ram_slot(slot: u32, flags: u32, gpa: u64, size: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(slot, flags, gpa, size, RAM_HVA + gpa)
}

fn tdp_vm(host: &Arc<AuditHost>, vcpus: usize) -> Vm<AuditHost> {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = vcpus;
    Vm::new(cfg, host.clone()).unwrap()
}

/// One TDP access as an embedder's loop does it: `Some(frame)` for RAM, `None` for MMIO.
fn tdp_access(v: &mut Vcpu<AuditHost>, gpa: u64, write: bool) -> Option<Pfn> {
    let need = if write { Access::WRITE } else { Access::NONE };
    let fa = if write { FaultAccess::WRITE } else { FaultAccess::READ };
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        v.service_requests().expect("a root");
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), need),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { pfn, .. } => return Some(pfn),
            HwWalk::Violation { .. } => v.handle_ept_violation(Gpa(gpa), fa),
            HwWalk::Misconfig { .. } => v.handle_ept_misconfig(Gpa(gpa)),
            HwWalk::Broken { dump } => panic!("broken tables: {dump}"),
        };
        match o {
            Ok(FaultOutcome::Emulate { .. }) => return None,
            Ok(_) => std::thread::yield_now(),
            // The inconsistent host's read-only page for a write: its refusal (the MMU takes it
            // as one, `HostMemory::translate`).
            Err(vmmu::fault::FaultError::HostFault { fault: HostFault::Protected(_), .. }) => {
                return None
            }
            Err(e) => panic!("fault: {e}"),
        }
    }
    panic!("access to {gpa:#x} never completed");
}

// ---------------------------------------------------------------------------------------------
// Re-entrancy and lock order between host invalidations and memslot updates.

/// A host with two invalidations in flight at once on one thread (two `invalidate_range_start`
/// before the ends: Linux runs them from different mm operations; a VMM may invalidate two
/// ranges and end both) while another thread's memslot update waits for invalidations to end.
/// KVM's `invalidate_range_start` never waits for a memslot update (the swap waits for
/// `mn_active_invalidate_count` under `mn_invalidate_lock`, which a start takes only to count);
/// here the second begin waited for the VMM lock the update held while it waited for the first
/// invalidation: a deadlock (and so did `zap_all_fast` and the dirty-log calls).
#[test]
fn a_second_invalidation_while_an_update_waits_does_not_deadlock() {
    let host = AuditHost::new(64);
    let vm = tdp_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 20)).unwrap();
    let inv1 = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1000));
    let updater = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.set_memory_region(&ram_slot(1, 0, 1 << 20, 1 << 20)))
    };
    std::thread::sleep(Duration::from_millis(200));
    let vm2 = vm.clone();
    let second = within(5, move || {
        let inv2 = vm2.invalidate_hva_range_begin(Hva(RAM_HVA + 0x2000), Hva(RAM_HVA + 0x3000));
        drop(inv2);
        // The VM's other serialised calls, while holding an invalidation, do not wait either.
        vm2.zap_all_fast();
        assert!(vm2.get_dirty_log(AsId(0), SlotId(0)).is_ok());
        assert!(vm2.clear_dirty_log_all(AsId(0), SlotId(0), 0, 64).is_ok());
        vm2.set_dirty_log_mode(vmmu::dirty::DirtyLogMode::Auto);
    });
    assert!(!updater.is_finished(), "the update went ahead during an invalidation");
    drop(inv1);
    assert!(second.is_some(), "the second begin waited for the update, which waits for the first");
    updater.join().unwrap().unwrap();
}

/// The same lock order with the VM's read-only-looking calls: a host that holds an invalidation
/// and asks `gfn_to_hva` (to find what it invalidates) or reads a dirty log meanwhile.
#[test]
fn gfn_to_hva_while_holding_an_invalidation_and_an_update_waits_does_not_deadlock() {
    let host = AuditHost::new(64);
    let vm = tdp_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1000));
    let updater = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.set_memory_region(&ram_slot(1, 0, 1 << 20, 1 << 20)))
    };
    std::thread::sleep(Duration::from_millis(200));
    let vm2 = vm.clone();
    let got = within(5, move || vm2.gfn_to_hva(AsId(0), vmmu::Gfn(0)));
    drop(inv);
    assert!(got.is_some(), "gfn_to_hva waited for the update, which waits for the invalidation");
    updater.join().unwrap().unwrap();
}

/// A host whose `translate` asks the VM something (`gfn_to_hva`) while another thread updates
/// the memslots: the fault is inside a memslot read section, the update holds the VMM lock and
/// waits for that section; `gfn_to_hva` waited for the VMM lock (embed45 finding 2b) and now
/// opens a read section of its own, the one call back into the VM the host traits' "Calling
/// context" allows.
#[test]
fn translate_calling_gfn_to_hva_during_an_update_does_not_deadlock() {
    let host = AuditHost::new(64);
    let vm = tdp_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    // The hook's handle closes a cycle (host -> hook -> VM -> host): the test takes it back at
    // the end, or the VM and its host would never be dropped.
    let vm_for_hook = Arc::new(Mutex::new(Some(vm.clone())));
    let hook_vm = vm_for_hook.clone();
    let started = Arc::new(AtomicBool::new(false));
    let started2 = started.clone();
    let _ = host.translate_hook.set(Box::new(move |_hva, _| {
        started2.store(true, Ordering::SeqCst);
        // Give the updater time to take the VMM lock and wait for this read section.
        std::thread::sleep(Duration::from_millis(300));
        let vm = hook_vm.lock().unwrap().clone();
        if let Some(vm) = vm {
            let _ = vm.gfn_to_hva(AsId(0), vmmu::Gfn(0));
        }
    }));
    let mut v = vm.create_vcpu().unwrap();
    let vm2 = vm.clone();
    let update = std::thread::spawn(move || {
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Two updates: the second edits the set the first unpublished, after a grace period.
        vm2.set_memory_region(&ram_slot(1, 0, 1 << 20, 1 << 20))?;
        vm2.set_memory_region(&ram_slot(2, 0, 2 << 20, 1 << 20))
    });
    // Not done in time if the fault and the update wait for each other.
    let faulter = within(10, move || tdp_access(&mut v, 0x1000, false));
    assert!(faulter.is_some(), "a fault whose translate asked gfn_to_hva deadlocked");
    update.join().unwrap().unwrap();
    vm_for_hook.lock().unwrap().take();
    drop(vm);
    assert_eq!(Arc::strong_count(&host), 1, "the VM was dropped and let its host go");
}

/// A host that needs its VM in a callback keeps a `WeakVm`: the callback reaches the VM while
/// it lives, and the VM's last handle still tears it down (every table page back, the host
/// released). The same host holding a `Vm` keeps both alive: the cycle the weak handle breaks.
#[cfg(not(loom))] // loom's `Arc` has no `Weak`, so no `Vm::downgrade` there
#[test]
fn a_host_holding_a_weak_vm_reaches_it_from_a_callback_and_lets_it_go() {
    let host = AuditHost::new(64);
    let vm = tdp_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    let weak = vm.downgrade();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let _ = host.translate_hook.set(Box::new(move |_hva, _| {
        let hva = weak.upgrade().and_then(|vm| vm.gfn_to_hva(AsId(0), vmmu::Gfn(1)));
        seen2.lock().unwrap().push(hva);
    }));
    let mut v = vm.create_vcpu().unwrap();
    assert!(tdp_access(&mut v, 0x1000, true).is_some());
    assert_eq!(*seen.lock().unwrap(), [Some(Hva(RAM_HVA + 0x1000))], "the callback saw its VM");
    let weak = vm.downgrade();
    drop(v);
    drop(vm);
    assert!(weak.upgrade().is_none(), "no handle lives");
    assert_eq!(live_tables(&host), 0, "the VM was torn down");
    assert_eq!(Arc::strong_count(&host), 1, "the VM let its host go");

    let host = AuditHost::new(64);
    let vm = tdp_vm(&host, 1);
    let strong = Arc::new(Mutex::new(Some(vm.clone())));
    let hook_vm = strong.clone();
    let _ = host.translate_hook.set(Box::new(move |_hva, _| {
        if let Some(vm) = hook_vm.lock().unwrap().as_ref() {
            let _ = vm.gfn_to_hva(AsId(0), vmmu::Gfn(1));
        }
    }));
    drop(vm);
    assert_eq!(Arc::strong_count(&host), 2, "a host holding its Vm keeps itself alive");
    // Only taking the strong handle back breaks the cycle (the test does, so that LeakSanitizer
    // finds nothing left behind).
    strong.lock().unwrap().take();
    assert_eq!(Arc::strong_count(&host), 1, "the last handle went and the VM let its host go");
}

/// The host callbacks a copy-on-write break can happen in, inside a fault's memslot read
/// section: `translate` (KVM `hva_to_pfn`), and `cmpxchg_u64` setting a guest PTE's A/D bits
/// (KVM `FNAME(update_accessed_dirty_bits)`, a user-memory cmpxchg that may fault).
#[cfg(not(loom))]
#[derive(Clone, Copy, Debug)]
enum CowIn {
    Translate,
    GuestPteWrite,
}

/// Shares guest RAM page `page` (pages from `RAM_HVA`) copy-on-write, and has `host` break it
/// inside the first write to it through callback `cb`, as Linux does for a write to a shared
/// page (`wp_page_copy`: `invalidate_range_start`, a new page, `invalidate_range_end`, all
/// inside the fault that wrote, in the fault's memslot read section). With `update`, the
/// callback first starts that memslot update on another thread and lets it publish, so the
/// update waits for the very read section the begin runs in. The update's thread, if any, is
/// returned once the callback has run.
#[cfg(not(loom))] // loom's `Arc` has no `Weak`
fn break_cow_in(
    cb: CowIn,
    host: &Arc<AuditHost>,
    vm: &Vm<AuditHost>,
    page: u64,
    update: Option<UserspaceMemoryRegion>,
) -> Arc<Mutex<Option<std::thread::JoinHandle<()>>>> {
    let weak = vm.downgrade();
    let host_weak = Arc::downgrade(host);
    let armed = AtomicBool::new(true);
    let updater = Arc::new(Mutex::new(None));
    let updater2 = updater.clone();
    host.cow.lock().unwrap().push(page);
    let hook = match cb {
        CowIn::Translate => &host.translate_hook,
        CowIn::GuestPteWrite => &host.cmpxchg_hook,
    };
    let _ = hook.set(Box::new(move |hva, access| {
        let start = Hva(RAM_HVA + (page << 12));
        if hva.raw() >> 12 != start.raw() >> 12
            || access != HostAccess::Write
            || !armed.swap(false, Ordering::SeqCst)
        {
            return;
        }
        let (Some(vm), Some(host)) = (weak.upgrade(), host_weak.upgrade()) else { return };
        if let Some(r) = update {
            let before = vm.memslots().generation(AsId(0)).unwrap();
            let vm2 = vm.clone();
            *updater2.lock().unwrap() = Some(std::thread::spawn(move || {
                vm2.set_memory_region(&r).unwrap();
            }));
            while vm.memslots().generation(AsId(0)).unwrap() == before {
                std::thread::yield_now();
            }
        }
        let inv = vm.invalidate_hva_range_begin(start, Hva(start.raw() + 0x1000));
        host.copied.lock().unwrap().push(page);
        inv.end();
    }));
    updater
}

/// The memslot updates a copy-on-write break in `translate` races with: none, a create (one
/// publication), a delete and a move (two publications, the first of an invalid slot, then a
/// zap) of slot 2, one page at `slot2_gpa`.
#[cfg(not(loom))]
fn cow_races(slot2_gpa: u64) -> [(&'static str, Option<UserspaceMemoryRegion>); 4] {
    let hva = RAM_HVA + slot2_gpa;
    [
        ("alone", None),
        ("create", Some(UserspaceMemoryRegion::new(3, 0, 0x100_0000, 0x1000, hva + 0x1000))),
        ("delete", Some(UserspaceMemoryRegion::new(2, 0, slot2_gpa, 0, hva))),
        ("move", Some(UserspaceMemoryRegion::new(2, 0, 0x100_0000, 0x1000, hva))),
    ]
}

/// A host that breaks copy-on-write inside `translate` (a begin and an end from the callback,
/// inside the faulting vCPU's memslot read section), alone and while a memslot update waits
/// for that read section: the write fault finishes and maps the copy, and no access reaches
/// the page's first frame afterwards (TDP). On the protocol before ca90737 the begin waited
/// for the update, which waited for the begin's own read section.
#[cfg(not(loom))]
#[test]
fn translate_may_break_copy_on_write_with_an_invalidation_tdp() {
    for (what, update) in cow_races(2 << 20) {
        let host = AuditHost::new(64);
        let vm = tdp_vm(&host, 1);
        vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
        vm.set_memory_region(&ram_slot(2, 0, 2 << 20, 0x1000)).unwrap();
        let updater = break_cow_in(CowIn::Translate, &host, &vm, 5, update);
        let mut v = vm.create_vcpu().unwrap();
        assert_eq!(tdp_access(&mut v, 0x5000, false), Some(Pfn(RAM_BASE_PFN + 5)));
        assert_eq!(tdp_access(&mut v, 2 << 20, false), Some(Pfn(RAM_BASE_PFN + 0x200)));
        let (mut v, got) = within(10, move || {
            let got = tdp_access(&mut v, 0x5000, true);
            (v, got)
        })
        .unwrap_or_else(|| panic!("{what}: the write whose translate broke COW hung"));
        assert!(host.copied.lock().unwrap().contains(&5), "{what}: no COW break");
        assert_eq!(got, Some(Pfn(COPY_BASE_PFN + 5)), "{what}: the write maps the copy");
        assert_eq!(tdp_access(&mut v, 0x5000, false), Some(Pfn(COPY_BASE_PFN + 5)), "{what}");
        let updater = updater.lock().unwrap().take();
        if let Some(t) = updater {
            within(10, move || t.join().unwrap()).expect("the update hung");
        }
        let slot2 = tdp_access(&mut v, 2 << 20, false);
        assert_eq!(slot2.is_some(), matches!(what, "alone" | "create"), "{what}: slot 2");
    }
}

/// The same under shadow paging, and for the guest walk's A/D update too: the first read
/// through gva 0x40_5000 sets the A bit of its guest PTE, in guest table page 4, whose
/// copy-on-write the host breaks there. Either way the write through the guest's mapping maps
/// the page's frame (the copy, when the data page was the one copied).
#[cfg(not(loom))]
#[test]
fn a_shadow_faults_callbacks_may_break_copy_on_write_with_an_invalidation() {
    for (what, update) in cow_races(3 << 20) {
        for cb in [CowIn::Translate, CowIn::GuestPteWrite] {
            let host = AuditHost::new(256);
            let vm = shadow_vm(&host, 1);
            vm.set_memory_region(&ram_slot(0, 0, 0, 3 << 20)).unwrap();
            vm.set_memory_region(&ram_slot(2, 0, 3 << 20, 0x1000)).unwrap();
            let cr3 = build_long4(&host);
            let mut v = vm.create_vcpu().unwrap();
            v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
            v.load_cr3(cr3).unwrap();
            // gva 0x40_5000 maps gpa 0x10_5000 (guest RAM page 0x105) through PT page 4.
            let (page, data) = match cb {
                CowIn::Translate => (0x105, COPY_BASE_PFN + 0x105),
                CowIn::GuestPteWrite => (4, RAM_BASE_PFN + 0x105),
            };
            let updater = break_cow_in(cb, &host, &vm, page, update);
            let (mut v, read, write) = within(10, move || {
                let read = shadow_access(&mut v, 0x40_5000, false);
                let write = shadow_access(&mut v, 0x40_5000, true);
                (v, read, write)
            })
            .unwrap_or_else(|| panic!("{what} {cb:?}: the access that broke COW hung"));
            assert!(host.copied.lock().unwrap().contains(&page), "{what} {cb:?}: no COW break");
            assert_eq!(read, Ok(Some(Pfn(RAM_BASE_PFN + 0x105))), "{what} {cb:?}: the read");
            assert_eq!(write, Ok(Some(Pfn(data))), "{what} {cb:?}: the write");
            assert_eq!(shadow_access(&mut v, 0x40_5000, false), Ok(Some(Pfn(data))));
            let pte = host.ram[(0x4000 + 5 * 8) / 8].load(Ordering::SeqCst);
            assert_eq!(pte & 0x60, 0x60, "{what} {cb:?}: the walks set the A and D bits");
            let updater = updater.lock().unwrap().take();
            if let Some(t) = updater {
                within(10, move || t.join().unwrap()).expect("the update hung");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Several VMs and vCPU threads, memslot churn, invalidations, dirty logging, odd drop orders.

#[test]
fn several_vms_and_vcpu_threads_with_memslot_churn() {
    let host = AuditHost::new(2048);
    let vms: Vec<Vm<AuditHost>> = (0..2).map(|_| tdp_vm(&host, 3)).collect();
    for vm in &vms {
        vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for vm in &vms {
        for t in 0..3u64 {
            let mut v = vm.create_vcpu().unwrap();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let gpa = ((i * 7 + t) % 768) << 12;
                    if let Some(pfn) = tdp_access(&mut v, gpa, i % 3 == 0) {
                        // Slots 0 and 1 (before its move) map gpa g to RAM_HVA + g; slot 1
                        // moved to [2 MiB, 3 MiB) keeps its host range [1 MiB, 2 MiB).
                        let hva_off = if gpa >= 2 << 20 { gpa - (1 << 20) } else { gpa };
                        assert_eq!(pfn.raw(), RAM_BASE_PFN + (hva_off >> 12), "gpa {gpa:#x}");
                    }
                    // MMIO and far addresses too.
                    let _ = tdp_access(&mut v, 0xfee0_0000 + (i % 4) * 0x1000, false);
                    v.service_requests().unwrap();
                    let _ = v.handle_ept_violation(Gpa(!0xfffu64), FaultAccess::READ);
                    let _ = v.handle_ept_misconfig(Gpa(1 << 52));
                    let _ = v.handle_npf(Gpa(0x3000), PfErr(u64::MAX));
                    i += 1;
                }
                // The vCPU outlives (or not) its VM's other handles: dropped here, on its thread.
                drop(v);
            }));
        }
    }
    for round in 0..40u64 {
        for vm in &vms {
            // Slot 1 at [1 MiB, 2 MiB) created, logged, moved to [2 MiB, 3 MiB), unlogged,
            // deleted; slot 0 re-flagged.
            vm.set_memory_region(&ram_slot(1, 0, 1 << 20, 1 << 20)).unwrap();
            vm.set_memory_region(&ram_slot(1, KVM_MEM_LOG_DIRTY_PAGES, 1 << 20, 1 << 20)).unwrap();
            let log = vm.get_dirty_log(AsId(0), SlotId(1)).unwrap();
            assert_eq!(log.len(), 4);
            // A move keeps the host range: the same hva at another gpa.
            let moved = UserspaceMemoryRegion::new(
                1,
                KVM_MEM_LOG_DIRTY_PAGES,
                2 << 20,
                1 << 20,
                RAM_HVA + (1 << 20),
            );
            vm.set_memory_region(&moved).unwrap();
            vm.clear_dirty_log_all(AsId(0), SlotId(1), 0, 256).unwrap();
            let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + (round << 12)));
            drop(inv);
            vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, 0, 0)).unwrap();
            vm.set_memory_region(&ram_slot(
                0,
                KVM_MEM_LOG_DIRTY_PAGES * (round as u32 % 2),
                0,
                1 << 20,
            ))
            .unwrap();
            vm.zap_all_fast();
            vm.reclaim();
        }
    }
    // Drop every VM handle while the vCPU threads still run.
    drop(vms);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a vCPU thread panicked");
    }
}

/// After the slot at [1 MiB, 2 MiB) moved to [2 MiB, 3 MiB) with the same host range, a guest
/// access at the new gpa maps the old host frames (hva is what names the frame).
#[test]
fn a_moved_slot_maps_its_host_range_at_the_new_gpa() {
    let host = AuditHost::new(256);
    let vm = tdp_vm(&host, 1);
    let mut v = vm.create_vcpu().unwrap();
    vm.set_memory_region(&ram_slot(1, 0, 1 << 20, 1 << 20)).unwrap();
    assert_eq!(tdp_access(&mut v, 0x10_1000, false), Some(Pfn(RAM_BASE_PFN + 0x101)));
    let moved = UserspaceMemoryRegion::new(1, 0, 2 << 20, 1 << 20, RAM_HVA + (1 << 20));
    vm.set_memory_region(&moved).unwrap();
    assert_eq!(tdp_access(&mut v, 0x10_1000, false), None, "the old gpa is MMIO now");
    assert_eq!(tdp_access(&mut v, 0x20_1000, false), Some(Pfn(RAM_BASE_PFN + 0x101)));
}

// ---------------------------------------------------------------------------------------------
// Shadow paging: 4-level and PAE guests on threads.

fn shadow_vm(host: &Arc<AuditHost>, vcpus: usize) -> Vm<AuditHost> {
    let mut cfg = VmConfig::shadow(46).unwrap();
    cfg.max_vcpus = vcpus;
    Vm::new(cfg, host.clone()).unwrap()
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;

/// 4-level guest tables: PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000; gva 0x40_0000 +
/// 4 KiB * i maps gpa 0x10_0000 + 4 KiB * i for i < 512.
fn build_long4(host: &AuditHost) -> u64 {
    host.write_gpa(0x1000, 0x2000 | P | RW | US);
    host.write_gpa(0x2000, 0x3000 | P | RW | US);
    host.write_gpa(0x3000 + 2 * 8, 0x4000 | P | RW | US);
    for i in 0..512u64 {
        host.write_gpa(0x4000 + i * 8, (0x10_0000 + (i << 12)) | P | RW | US);
    }
    0x1000
}

/// PAE guest tables: PDPT at 0x5000, PD 0x6000 (PDPTE 0), PT 0x7000; gva 0x40_0000 + 4 KiB * i
/// maps gpa 0x20_0000 + 4 KiB * i.
fn build_pae(host: &AuditHost) -> (u64, [u64; 4]) {
    host.write_gpa(0x5000, 0x6000 | P);
    host.write_gpa(0x6000 + 2 * 8, 0x7000 | P | RW | US);
    for i in 0..512u64 {
        host.write_gpa(0x7000 + i * 8, (0x20_0000 + (i << 12)) | P | RW | US);
    }
    (0x5000, [0x6000 | P, 0, 0, 0])
}

fn shadow_access(v: &mut Vcpu<AuditHost>, gva: u64, write: bool) -> Result<Option<Pfn>, String> {
    let need = if write { Access::WRITE } else { Access::NONE };
    let err = if write { PfErr(PfErr::WRITE) } else { PfErr(0) };
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        v.service_requests().map_err(|e| e.to_string())?;
        let walk = match v.enter_guest() {
            Ok(g) => g.walk_gva(Gva(gva), need),
            Err(_) => continue,
        };
        let o = match walk {
            HwWalk::Translated { pfn, .. } => return Ok(Some(pfn)),
            HwWalk::Violation { present, .. } => {
                let e = if present { PfErr(err.0 | PfErr::PRESENT) } else { err };
                v.handle_page_fault(Gva(gva), e)
            }
            HwWalk::Misconfig { .. } => v.handle_page_fault(Gva(gva), PfErr(err.0 | PfErr::RSVD)),
            HwWalk::Broken { dump } => panic!("broken tables: {dump}"),
        };
        match o.map_err(|e| e.to_string())? {
            FaultOutcome::Emulate { .. } => return Ok(None),
            FaultOutcome::GuestPageFault { .. } => return Err("guest #PF".into()),
            FaultOutcome::Fixed | FaultOutcome::Spurious | FaultOutcome::Retry(_) => {}
        }
    }
    let mut last = Vec::new();
    for _ in 0..8 {
        let _ = v.service_requests();
        let walk = v.enter_guest().map(|g| g.walk_gva(Gva(gva), need));
        let o = match &walk {
            Ok(HwWalk::Violation { present, .. }) => {
                let e = if *present { PfErr(err.0 | PfErr::PRESENT) } else { err };
                Some(v.handle_page_fault(Gva(gva), e))
            }
            _ => None,
        };
        last.push(format!("{walk:?} -> {o:?}"));
    }
    Err(format!("access to gva {gva:#x} never completed: {last:#?}"))
}

#[test]
fn shadow_long4_and_pae_guests_on_threads_with_memslot_churn() {
    let host = AuditHost::new(2048);
    let vm = shadow_vm(&host, 4);
    vm.set_memory_region(&ram_slot(0, 0, 0, 3 << 20)).unwrap();
    let cr3 = build_long4(&host);
    let (pae_cr3, _) = build_pae(&host);
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let mut v = vm.create_vcpu().unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            if t % 2 == 0 {
                v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
                v.load_cr3(cr3).unwrap();
            } else {
                v.set_guest_cpu(GuestCpu {
                    mode: PagingMode::Pae { pdptrs: [0; 4] },
                    ..GuestCpu::long4(0, 36)
                })
                .unwrap();
                v.load_cr3(pae_cr3).unwrap();
            }
            let base = if t % 2 == 0 { 0x10_0000 } else { 0x20_0000 };
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let gva = 0x40_0000 + ((i * 5 + t) % 512) * 0x1000;
                match shadow_access(&mut v, gva, i % 4 == 0) {
                    Ok(Some(pfn)) => {
                        let gpa = base + (gva - 0x40_0000);
                        assert_eq!(pfn.raw(), RAM_BASE_PFN + (gpa >> 12), "gva {gva:#x}");
                    }
                    // MMIO while slot 0 is being changed: fine.
                    Ok(None) => {}
                    Err(e) => panic!("vCPU {t}: {e}"),
                }
                // Edge values through the same entry points.
                let _ = v.handle_page_fault(Gva(0x8000_0000_0000), PfErr(0));
                let _ = v.handle_page_fault(Gva(u64::MAX), PfErr(u64::MAX));
                let _ = v.track_write(Gpa(u64::MAX - 3), u32::MAX);
                let _ = v.track_write(Gpa(0x4000 + (i % 512) * 8), 8);
                let _ = v.invlpg(Gva(gva));
                if i % 64 == 0 {
                    let _ = v.load_cr3(if t % 2 == 0 { cr3 } else { pae_cr3 });
                }
                i += 1;
            }
        }));
    }
    for round in 0..30u32 {
        vm.set_memory_region(&ram_slot(0, KVM_MEM_LOG_DIRTY_PAGES * (round % 2), 0, 3 << 20))
            .unwrap();
        if round % 2 == 1 {
            let _ = vm.get_dirty_log(AsId(0), SlotId(0)).unwrap();
        }
        let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA + 0x10_0000), Hva(RAM_HVA + 0x30_0000));
        drop(inv);
        vm.shrink_shadow_pages(usize::MAX);
        let _ = vm.set_nr_mmu_pages(64 + round as usize);
        vm.set_memory_region(&ram_slot(2, 0, 8 << 20, 1 << 20)).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(2, 0, 0, 0, 0)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    drop(vm);
    for t in threads {
        t.join().expect("a vCPU thread panicked");
    }
}

// ---------------------------------------------------------------------------------------------
// Misbehaving hosts.

/// `translate` names another frame (and a 1 GiB level it cannot honour, and alternating
/// writability) on every call for the same page: the MMU must not panic, hang or break its
/// tables; the guest sees whatever frames the host named.
#[test]
fn an_inconsistent_translate_breaks_nothing() {
    let host = AuditHost::new(512);
    host.inconsistent.store(true, Ordering::Relaxed);
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let mut cfg = VmConfig::new(format, 46).unwrap();
        cfg.max_vcpus = 2;
        let vm = Vm::new(cfg, host.clone()).unwrap();
        vm.set_memory_region(&ram_slot(0, 0, 0, RAM_BYTES)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        for i in 0..2000u64 {
            let gpa = (i % 1024) << 12;
            let _ = tdp_access(&mut v, gpa, i % 2 == 0);
            if i % 100 == 0 {
                vm.set_memory_region(&ram_slot(0, (i as u32 / 100) % 2, 0, RAM_BYTES)).unwrap();
            }
        }
    }
    let vm = shadow_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, 0, 0, RAM_BYTES)).unwrap();
    let cr3 = build_long4(&host);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
    v.load_cr3(cr3).unwrap();
    for i in 0..1000u64 {
        let _ = shadow_access(&mut v, 0x40_0000 + (i % 512) * 0x1000, i % 2 == 0);
    }
}

/// A `translate` that panics (a host bug) unwinds out of the fault; the VM stays usable: a
/// memslot update does not wait forever for the dead fault's read section, and the next fault
/// works.
#[test]
fn a_panicking_translate_leaves_the_vm_usable() {
    let host = AuditHost::new(256);
    let armed = Arc::new(AtomicBool::new(true));
    let armed2 = armed.clone();
    let _ = host.translate_hook.set(Box::new(move |_, _| {
        if armed2.swap(false, Ordering::SeqCst) {
            panic!("host bug in translate");
        }
    }));
    let vm = tdp_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v.handle_ept_violation(Gpa(0x1000), FaultAccess::READ)
    }));
    assert!(r.is_err());
    let vm2 = vm.clone();
    assert!(
        within(5, move || vm2.set_memory_region(&ram_slot(1, 0, 1 << 20, 1 << 20)).unwrap())
            .is_some(),
        "an update waited for a read section the panic left open"
    );
    assert_eq!(tdp_access(&mut v, 0x1000, false), Some(Pfn(RAM_BASE_PFN + 1)));
}

/// A guest-memory read that panics in the shadow walk, and one that is slow while the memslots
/// change: no hang, and the VM stays usable.
#[test]
fn a_panicking_or_slow_guest_memory_read_leaves_the_shadow_vm_usable() {
    let host = AuditHost::new(512);
    let mode = Arc::new(AtomicUsize::new(0));
    let mode2 = mode.clone();
    let _ = host.read_hook.set(Box::new(move |_| match mode2.load(Ordering::SeqCst) {
        1 => {
            mode2.store(0, Ordering::SeqCst);
            panic!("host bug in read_u64");
        }
        2 => std::thread::sleep(Duration::from_millis(5)),
        _ => {}
    }));
    let vm = shadow_vm(&host, 1);
    vm.set_memory_region(&ram_slot(0, 0, 0, 2 << 20)).unwrap();
    let cr3 = build_long4(&host);
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
    v.load_cr3(cr3).unwrap();
    v.service_requests().unwrap();
    mode.store(1, Ordering::SeqCst);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        v.handle_page_fault(Gva(0x40_0000), PfErr(0))
    }));
    assert!(r.is_err());
    mode.store(2, Ordering::SeqCst);
    let vm2 = vm.clone();
    let updater = std::thread::spawn(move || {
        for i in 0..10u32 {
            vm2.set_memory_region(&ram_slot(0, i % 2, 0, 2 << 20)).unwrap();
        }
    });
    for i in 0..50u64 {
        let r = shadow_access(&mut v, 0x40_0000 + i * 0x1000, false);
        assert!(r.is_ok(), "{r:?}");
    }
    assert!(within(20, move || updater.join().unwrap()).is_some());
}

// ---------------------------------------------------------------------------------------------
// Edge values on every entry point: errors, never panics.

#[test]
fn edge_values_give_errors_not_panics() {
    let host = AuditHost::new(256);
    // VM configurations.
    assert!(VmConfig::new(FormatKind::Ept, 0).is_err());
    assert!(VmConfig::new(FormatKind::Ept, 255).is_err());
    for nr_as in [0u16, 3, u16::MAX] {
        let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
        cfg.nr_address_spaces = nr_as;
        assert!(Vm::new(cfg, host.clone()).is_err(), "nr_address_spaces {nr_as}");
    }
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.root_level = Level::L1G;
    assert!(Vm::new(cfg, host.clone()).is_err());
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = usize::MAX;
    assert!(Vm::new(cfg, host.clone()).is_err());
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.max_vcpus = 0;
    assert!(Vm::new(cfg, host.clone()).is_err(), "a VM for no vCPU");
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.generation_base = u64::MAX;
    let _ = Vm::new(cfg, host.clone()).map(|vm| vm.set_memory_region(&ram_slot(0, 0, 0, 4096)));

    let vm = tdp_vm(&host, 2);
    let errno =
        |r: UserspaceMemoryRegion| vm.set_memory_region(&r).map_err(|e| e.errno().to_string());
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 0, 4095, RAM_HVA)), Err("EINVAL".into()));
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 1, 4096, RAM_HVA)), Err("EINVAL".into()));
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 0, 4096, RAM_HVA + 1)), Err("EINVAL".into()));
    assert_eq!(
        errno(UserspaceMemoryRegion::new(0, 1 << 5, 0, 4096, RAM_HVA)),
        Err("EINVAL".into())
    );
    assert_eq!(
        errno(UserspaceMemoryRegion::new(1 << 16, 0, 0, 4096, RAM_HVA)),
        Err("EINVAL".into())
    );
    assert_eq!(errno(UserspaceMemoryRegion::new(32764, 0, 0, 4096, RAM_HVA)), Err("EINVAL".into()));
    assert_eq!(
        errno(UserspaceMemoryRegion::new(0, 0, !0xfffu64, 4096, 0x1000)),
        Err("EINVAL".into())
    );
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 0, !0xfffu64, 0x1000)), Err("EINVAL".into()));
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 0, 4096, !0xfffu64)), Err("EINVAL".into()));
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 0, 0, 0)), Err("EINVAL".into()));
    assert_eq!(
        errno(UserspaceMemoryRegion::new(0, 0, 1 << 46, 4096, 0x1000)),
        Err("EINVAL".into())
    );
    // The last page below 2^46 is the VM's max gfn.
    assert!(errno(UserspaceMemoryRegion::new(5, 0, (1 << 46) - 4096, 4096, 0x1000)).is_ok());
    assert!(errno(UserspaceMemoryRegion::new(0, 0, 0, 4096, RAM_HVA)).is_ok());
    assert_eq!(errno(UserspaceMemoryRegion::new(1, 0, 0, 4096, RAM_HVA)), Err("EEXIST".into()));
    // Modify: other size / hva / READONLY toggled.
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 0, 0, 8192, RAM_HVA)), Err("EINVAL".into()));
    assert_eq!(
        errno(UserspaceMemoryRegion::new(0, 0, 0, 4096, RAM_HVA + 4096)),
        Err("EINVAL".into())
    );
    assert_eq!(errno(UserspaceMemoryRegion::new(0, 2, 0, 4096, RAM_HVA)), Err("EINVAL".into()));
    // Identical re-set: a no-op.
    assert!(errno(UserspaceMemoryRegion::new(0, 0, 0, 4096, RAM_HVA)).is_ok());

    // Dirty log ids and ranges.
    assert!(vm.get_dirty_log(AsId(u16::MAX), SlotId(u16::MAX)).is_err());
    assert!(vm.get_dirty_log(AsId(0), SlotId(0)).is_err());
    assert!(vm.clear_dirty_log(AsId(0), SlotId(0), u64::MAX, u32::MAX, &[]).is_err());
    assert!(vm.clear_dirty_log_all(AsId(0), SlotId(0), !63u64, u32::MAX).is_err());
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 1, 0, 4096, RAM_HVA)).unwrap();
    assert!(vm.clear_dirty_log(AsId(0), SlotId(0), !63u64, u32::MAX, &[]).is_err());
    assert!(vm.clear_dirty_log(AsId(0), SlotId(0), 0, 1, &[]).is_err());
    assert!(vm.clear_dirty_log(AsId(0), SlotId(0), 0, 1, &[u64::MAX; 4]).is_ok());
    assert_eq!(vm.gfn_to_hva(AsId(7), vmmu::Gfn(u64::MAX)), None);
    assert_eq!(vm.memslots().generation(AsId(9)), None);
    drop(vm.invalidate_hva_range_begin(Hva(u64::MAX), Hva(0)));
    drop(vm.invalidate_hva_range_begin(Hva(0), Hva(u64::MAX)));
    assert!(vm.set_nr_mmu_pages(usize::MAX).is_ok());
    assert!(vm.set_nr_mmu_pages(0).is_err());

    // vCPU entry points with wild addresses and error codes.
    let mut v = vm.create_vcpu().unwrap();
    assert!(v.set_as_id(AsId(1)).is_err());
    v.mark_page_dirty(Gpa(u64::MAX));
    for gpa in [0, u64::MAX, 1 << 48, 1 << 52, (1 << 46) - 1] {
        let _ = v.handle_ept_violation(Gpa(gpa), FaultAccess::WRITE);
        let _ = v.handle_ept_misconfig(Gpa(gpa));
        let _ = v.handle_npf(Gpa(gpa), PfErr(u64::MAX));
        v.service_requests().unwrap();
        let _ =
            v.handle_ept_violation(Gpa(gpa), FaultAccess { write: true, exec: true, user: true });
        let _ = v.handle_ept_misconfig(Gpa(gpa));
        let _ = v.handle_npf(Gpa(gpa), PfErr(u64::MAX));
        let g = v.enter_guest().unwrap();
        let _ = g.walk(Gpa(gpa), Access::from_bits(0xff));
        drop(g);
    }
    // Shadow entry points on a TDP vCPU are errors.
    assert!(v.load_cr3(0).is_err());
    assert!(v.track_write(Gpa(0), 8).is_err());
    assert!(v.handle_page_fault(Gva(0), PfErr(0)).is_err());

    // A shadow vCPU with odd guest CPU values.
    let svm = shadow_vm(&host, 1);
    svm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    let mut s = svm.create_vcpu().unwrap();
    for maxphyaddr in [0u8, 1, 12, 63, 64, 255] {
        for mode in
            [PagingMode::Long4, PagingMode::Pae { pdptrs: [u64::MAX; 4] }, PagingMode::NonPaging]
        {
            let cpu = GuestCpu {
                mode,
                cr3: u64::MAX,
                cr0_wp: false,
                efer_nx: false,
                maxphyaddr,
                gbpages: true,
            };
            s.set_guest_cpu(cpu).unwrap();
            let _ = s.load_cr3(u64::MAX);
            let _ = s.load_cr3(0x1000);
            let _ = s.service_requests();
            for gva in [0u64, 0x40_0000, u64::MAX, 0xffff_8000_0000_0000, 0xffff_ffff] {
                let _ = s.handle_page_fault(Gva(gva), PfErr(0));
                let _ = s.handle_page_fault(Gva(gva), PfErr(PfErr::RSVD | PfErr::WRITE));
                let _ = s.handle_page_fault(Gva(gva), PfErr(u64::MAX));
                let _ = s.service_requests();
                if let Ok(g) = s.enter_guest() {
                    let _ = g.walk_gva(Gva(gva), Access::from_bits(0xff));
                }
            }
        }
    }
}

/// A VM dropped while an invalidation is held and a vCPU lives on; the vCPU then dropped on
/// another thread; the invalidation ended last.
#[test]
fn odd_drop_orders() {
    let host = AuditHost::new(256);
    let vm = tdp_vm(&host, 2);
    vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert!(tdp_access(&mut v, 0x1000, true).is_some());
    let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1000));
    drop(vm);
    // The vCPU still works (its access to the invalidated page retries until the end).
    assert!(tdp_access(&mut v, 0x2000, false).is_some());
    v.enter_guest_mode().unwrap();
    let t = std::thread::spawn(move || drop(v));
    t.join().unwrap();
    drop(inv);
    let pages_live = host.live.iter().filter(|l| l.load(Ordering::Relaxed)).count();
    assert_eq!(pages_live, 0, "every table page went back to the host with the last handle");
}

fn live_tables(host: &AuditHost) -> usize {
    host.live.iter().filter(|l| l.load(Ordering::Relaxed)).count()
}

/// A hypervisor that creates and destroys VMs on one frame pool gets every table page back
/// when a VM's last handle goes, whatever the MMU and whichever handle goes last. (Before the
/// fix, a valid TDP root and its tables, unpinned shadow pages and the deferred-free queue were
/// never given back: a pool of a few hundred pages ran dry after a few dozen VMs.)
#[test]
fn dropping_a_vm_gives_every_table_page_back() {
    let host = AuditHost::new(128);
    let cr3 = build_long4(&host);
    let (pae_cr3, _) = build_pae(&host);
    for round in 0..200 {
        let vm = match round % 3 {
            0 => tdp_vm(&host, 2),
            _ => shadow_vm(&host, 2),
        };
        vm.set_memory_region(&ram_slot(0, 0, 0, 3 << 20)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        match round % 3 {
            0 => assert!(tdp_access(&mut v, 0x1000, true).is_some()),
            1 => {
                v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
                v.load_cr3(cr3).unwrap();
                assert!(shadow_access(&mut v, 0x40_0000, true).unwrap().is_some());
            }
            _ => {
                let pae =
                    GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..GuestCpu::long4(0, 36) };
                v.set_guest_cpu(pae).unwrap();
                v.load_cr3(pae_cr3).unwrap();
                assert!(shadow_access(&mut v, 0x40_0000, true).unwrap().is_some());
            }
        }
        // Either handle may go last.
        if round % 2 == 0 {
            drop(v);
            drop(vm);
        } else {
            drop(vm);
            drop(v);
        }
        assert_eq!(live_tables(&host), 0, "round {round}: table pages outlived their VM");
    }
}

/// An `alloc_table` that panics (a host bug) in the middle of a TDP fault (MMU lock held
/// shared) and of a shadow fault (shadow lock held) unwinds out of the fault; the VM stays
/// usable and gives every page back when dropped.
#[test]
fn a_panicking_alloc_table_leaves_the_vm_usable() {
    let host = AuditHost::new(256);
    let armed = Arc::new(AtomicUsize::new(0));
    let armed2 = armed.clone();
    let _ = host.alloc_hook.set(Box::new(move |_| {
        // Panics at the n-th allocation after arming.
        if armed2.load(Ordering::SeqCst) == 1 {
            armed2.store(0, Ordering::SeqCst);
            panic!("host bug in alloc_table");
        }
        let n = armed2.load(Ordering::SeqCst);
        if n > 1 {
            armed2.store(n - 1, Ordering::SeqCst);
        }
    }));
    let cr3 = build_long4(&host);
    for kind in 0..2 {
        for nth in 1..5 {
            let vm = if kind == 0 { tdp_vm(&host, 1) } else { shadow_vm(&host, 1) };
            vm.set_memory_region(&ram_slot(0, 0, 0, 3 << 20)).unwrap();
            let mut v = vm.create_vcpu().unwrap();
            if kind == 1 {
                v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
                v.load_cr3(cr3).unwrap();
            }
            armed.store(nth, Ordering::SeqCst);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if kind == 0 {
                    let _ = tdp_access(&mut v, 0x1000, true);
                } else {
                    let _ = shadow_access(&mut v, 0x40_0000, true);
                }
            }));
            armed.store(0, Ordering::SeqCst);
            let _ = r;
            let vm2 = vm.clone();
            let upd = within(5, move || {
                vm2.set_memory_region(&ram_slot(1, 0, 4 << 20, 1 << 20)).unwrap();
                vm2.set_memory_region(&ram_slot(1, 0, 0, 0)).unwrap();
                vm2.zap_all_fast();
            });
            assert!(upd.is_some(), "kind {kind} nth {nth}: an update hung after the panic");
            if kind == 0 {
                assert_eq!(tdp_access(&mut v, 0x1000, true), Some(Pfn(RAM_BASE_PFN + 1)));
            } else {
                let pfn = shadow_access(&mut v, 0x40_0000, true).unwrap();
                assert_eq!(pfn, Some(Pfn(RAM_BASE_PFN + 0x100)));
            }
            drop(v);
            drop(vm);
            assert_eq!(live_tables(&host), 0, "kind {kind} nth {nth}: pages outlived the VM");
        }
    }
}

/// SMM: two address spaces, a slot in each mapping the same gpa to other host memory; a vCPU
/// switching between them sees each space's frame, for TDP and shadow paging, while another
/// thread changes the slots of both spaces.
#[test]
fn two_address_spaces_with_churn() {
    let host = AuditHost::new(512);
    let cr3 = build_long4(&host);
    for shadow in [false, true] {
        let mut cfg = if shadow { VmConfig::shadow(46).unwrap() } else { tdp_cfg() };
        cfg.nr_address_spaces = 2;
        cfg.max_vcpus = 1;
        let vm = Vm::new(cfg, host.clone()).unwrap();
        // AS 0: gpa 0..3 MiB -> RAM 0..3 MiB. AS 1: the same gpas, the guest tables in common,
        // but gpa 1 MiB.. backed by RAM at 3 MiB.. (hva offset 2 MiB).
        vm.set_memory_region(&ram_slot(0, 0, 0, 3 << 20)).unwrap();
        vm.set_memory_region(&ram_slot(1 << 16, 0, 0, 1 << 20)).unwrap();
        let smram =
            UserspaceMemoryRegion::new((1 << 16) | 1, 0, 1 << 20, 1 << 20, RAM_HVA + (3 << 20));
        vm.set_memory_region(&smram).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        if shadow {
            v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
            v.load_cr3(cr3).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let flags = i % 2;
                    vm.set_memory_region(&ram_slot(0, flags, 0, 3 << 20)).unwrap();
                    let smram = UserspaceMemoryRegion::new(
                        (1 << 16) | 1,
                        flags,
                        1 << 20,
                        1 << 20,
                        RAM_HVA + (3 << 20),
                    );
                    vm.set_memory_region(&smram).unwrap();
                    if flags == 1 {
                        let _ = vm.get_dirty_log(AsId(1), SlotId(1)).unwrap();
                    }
                    i += 1;
                }
            })
        };
        for i in 0..400u64 {
            let as_id = (i % 2) as u16;
            v.set_as_id(AsId(as_id)).unwrap();
            let page = i % 64;
            let (got, want) = if shadow {
                // gva 0x40_0000 + p maps gpa 0x10_0000 + p.
                let got = shadow_access(&mut v, 0x40_0000 + page * 0x1000, i % 3 == 0).unwrap();
                let base = if as_id == 0 { 0x100 } else { 0x300 };
                (got, Some(Pfn(RAM_BASE_PFN + base + page)))
            } else {
                let got = tdp_access(&mut v, 0x10_0000 + page * 0x1000, i % 3 == 0);
                let base = if as_id == 0 { 0x100 } else { 0x300 };
                (got, Some(Pfn(RAM_BASE_PFN + base + page)))
            };
            assert_eq!(got, want, "shadow {shadow} AS {as_id} page {page}");
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    }
}

fn tdp_cfg() -> VmConfig {
    VmConfig::new(FormatKind::Ept, 46).unwrap()
}

/// Every error an embedder gets for a bad configuration or request says, on one line, what was
/// wrong: the value it refused and the rule, or what to do instead.
#[test]
fn error_messages_name_the_value_and_the_rule() {
    let host = AuditHost::new(16);
    let show = |what: &str, e: &dyn std::fmt::Display, needles: &[&str]| {
        let m = e.to_string();
        assert!(!m.is_empty() && !m.contains('\n'), "{what}: {m:?}");
        for n in needles {
            assert!(m.contains(n), "{what}: {m:?} does not say {n:?}");
        }
    };
    for bits in [0u8, 64] {
        let e = VmConfig::new(FormatKind::Ept, bits).unwrap_err();
        show("phys_bits", &e, &[&format!("phys_bits={bits}"), "36..=52"]);
    }
    for nr_as in [0u16, 3] {
        let mut cfg = tdp_cfg();
        cfg.nr_address_spaces = nr_as;
        let e = Vm::new(cfg, host.clone()).err().unwrap();
        show("nr_as", &e, &["1 or 2", &format!("not {nr_as}")]);
    }
    let mut cfg = tdp_cfg();
    cfg.root_level = Level::L1G;
    show("root level 3", &Vm::new(cfg, host.clone()).err().unwrap(), &["root level 3", "4 or 5"]);
    let mut cfg = tdp_cfg();
    cfg.max_vcpus = 0;
    show("max_vcpus 0", &Vm::new(cfg, host.clone()).err().unwrap(), &["max_vcpus 0", "4096"]);
    let vm = tdp_vm(&host, 1);
    let _first = vm.create_vcpu().unwrap();
    show("create_vcpu past max", &vm.create_vcpu().err().unwrap(), &["1 vCPU(s)", "max_vcpus"]);
    let mut cfg = tdp_cfg();
    cfg.mmu = vmmu::vm::MmuKind::Shadow;
    show("shadow on EPT", &Vm::new(cfg, host.clone()).err().unwrap(), &["Npt", "not Ept"]);
    let vm = tdp_vm(&host, 1);
    for (r, needles) in [
        (UserspaceMemoryRegion::new(0, 0, 0, 4095, RAM_HVA), &["memory_size 0xfff", "4 KiB"][..]),
        (UserspaceMemoryRegion::new(0, 0, 1, 4096, RAM_HVA), &["guest_phys_addr 0x1", "aligned"]),
        (UserspaceMemoryRegion::new(0, 0, 0, 4096, RAM_HVA + 1), &["userspace_addr", "aligned"]),
        (UserspaceMemoryRegion::new(0, 1 << 5, 0, 4096, RAM_HVA), &["flags 0x20", "READONLY"]),
        (UserspaceMemoryRegion::new(1 << 16, 0, 0, 4096, RAM_HVA), &["address space 1", "has 1"]),
        (UserspaceMemoryRegion::new(32764, 0, 0, 4096, RAM_HVA), &["32764", "below 32764"]),
        (
            UserspaceMemoryRegion::new(0, 0, !0xfffu64, 4096, 0x1000),
            &["0xfffffffffffff000", "wraps"],
        ),
        (UserspaceMemoryRegion::new(0, 0, 0, 1 << 44, 0x1000), &["4294967296 pages", "2147483647"]),
        (UserspaceMemoryRegion::new(0, 0, 0, 4096, !0xfffu64), &["userspace range", "limit"]),
        (UserspaceMemoryRegion::new(0, 0, 0, 0, 0), &["delete slot 0", "does not exist"]),
        (UserspaceMemoryRegion::new(0, 0, 1 << 46, 4096, 0x1000), &["0x400000000", "0x3ffffffff"]),
    ] {
        show(&format!("{r:x?}"), &vm.set_memory_region(&r).unwrap_err(), needles);
    }
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 4096, RAM_HVA)).unwrap();
    let overlap = UserspaceMemoryRegion::new(1, 0, 0, 4096, RAM_HVA);
    show("EEXIST", &vm.set_memory_region(&overlap).unwrap_err(), &["slot 1 overlap slot 0"]);
    let resize = UserspaceMemoryRegion::new(0, 0, 0, 8192, RAM_HVA);
    show("resize", &vm.set_memory_region(&resize).unwrap_err(), &["memory_size", "delete it"]);
    show("dirty log, no slot", &vm.get_dirty_log(AsId(0), SlotId(3)).unwrap_err(), &["slot 3"]);
    show("dirty log, bad AS", &vm.get_dirty_log(AsId(3), SlotId(3)).unwrap_err(), &["space 3"]);
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    show("set_as_id 1", &v.set_as_id(AsId(1)).unwrap_err(), &["address space 1", "has 1"]);
    show("load_cr3 on TDP", &v.load_cr3(0).unwrap_err(), &["TDP MMU", "not shadow"]);
    let e = v.handle_page_fault(Gva(0), PfErr(0)).unwrap_err();
    show("#PF on TDP", &e, &["shadow-paging VM"]);
    vm.set_memory_region(&UserspaceMemoryRegion::new(2, 0, 1 << 30, 4096, 0x1000)).unwrap();
    let e = v.handle_ept_violation(Gpa(1 << 30), FaultAccess::READ).unwrap_err();
    show("fault outside RAM hva", &e, &["gpa 0x40000000", "host address 0x1000"]);
}

/// A vCPU that sits in raw guest mode and ignores its kicks holds up a zap's flush; dropping it
/// (on its thread) releases the zap, and a vCPU created meanwhile (taking the same index) does
/// not inherit the wait.
#[test]
fn dropping_a_vcpu_that_ignores_kicks_releases_a_waiting_zap() {
    for shadow in [false, true] {
        let host = AuditHost::new(256);
        let cr3 = build_long4(&host);
        let vm = if shadow { shadow_vm(&host, 1) } else { tdp_vm(&host, 1) };
        vm.set_memory_region(&ram_slot(0, 0, 0, 2 << 20)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        if shadow {
            v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
            v.load_cr3(cr3).unwrap();
            assert!(shadow_access(&mut v, 0x40_0000, true).unwrap().is_some());
        } else {
            assert!(tdp_access(&mut v, 0x1000, true).is_some());
        }
        v.service_requests().unwrap();
        v.enter_guest_mode().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let vcpu_thread = std::thread::spawn(move || {
            // Deaf to kicks until told to go.
            let _ = rx.recv();
            drop(v);
        });
        let vm2 = vm.clone();
        let zap = std::thread::spawn(move || {
            vm2.zap_all_fast();
            vm2.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 0, 0)).unwrap();
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!zap.is_finished(), "the zap should wait for the vCPU in guest mode");
        tx.send(()).unwrap();
        vcpu_thread.join().unwrap();
        let done = within(5, move || zap.join().is_ok());
        assert_eq!(done, Some(true), "shadow {shadow}: the zap still waits after the vCPU went");
        // The index is free again.
        let mut v2 = vm.create_vcpu().unwrap();
        v2.service_requests().unwrap();
        assert_eq!(v2.index(), 0);
    }
}

/// A host out of table frames: faults fail with a typed error (never a panic or a hang), the
/// vCPU keeps working for what is mapped, and once frames come back (a zap) faults work again.
#[test]
fn an_exhausted_frame_pool_gives_errors_and_recovers() {
    for shadow in [false, true] {
        let host = AuditHost::new(5);
        let cr3 = build_long4(&host);
        let vm = if shadow { shadow_vm(&host, 2) } else { tdp_vm(&host, 2) };
        vm.set_memory_region(&ram_slot(0, 0, 0, RAM_BYTES)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        if shadow {
            v.set_guest_cpu(GuestCpu::long4(0, 46)).unwrap();
            v.load_cr3(cr3).unwrap();
        }
        let mut errors = Vec::new();
        for page in 0..64u64 {
            // Far apart: each needs tables of its own.
            let r = if shadow {
                shadow_access(&mut v, 0x40_0000 + page * 0x1000, false)
            } else {
                let gpa = (page << 30) % (1 << 45);
                match v.service_requests() {
                    Err(e) => Err(e.to_string()),
                    Ok(_) => v
                        .handle_ept_violation(Gpa(gpa), FaultAccess::READ)
                        .map(|_| None)
                        .map_err(|e| e.to_string()),
                }
            };
            if let Err(e) = r {
                errors.push(e);
            }
        }
        // A second vCPU cannot get a root either, or shares one.
        let mut v2 = vm.create_vcpu().unwrap();
        let _ = v2.service_requests();
        println!("shadow {shadow}: {} errors, e.g. {:?}", errors.len(), errors.first());
        drop(v2);
        vm.zap_all_fast();
        vm.reclaim();
        if shadow {
            assert!(shadow_access(&mut v, 0x40_0000, true).unwrap().is_some());
        } else {
            assert!(tdp_access(&mut v, 0x1000, true).is_some());
        }
        drop(v);
        drop(vm);
        assert_eq!(live_tables(&host), 0);
    }
}

/// A type-stable host shared by two VMs (the fast MMIO path's sectionless leaf-table hits):
/// vCPU threads of both take EPT misconfigurations on MMIO pages while the other thread deletes
/// and recreates slots around them (zaps that free tables, reused at once by the other VM).
/// Every MMIO exit is emulated for the gpa it came for.
#[test]
fn type_stable_tables_shared_by_two_vms_under_zaps() {
    let host = AuditHost::with(256, true);
    let vms: Vec<Vm<AuditHost>> = (0..2).map(|_| tdp_vm(&host, 2)).collect();
    for vm in &vms {
        vm.set_memory_region(&ram_slot(0, 0, 0, 1 << 20)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for vm in &vms {
        for t in 0..2u64 {
            let mut v = vm.create_vcpu().unwrap();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // MMIO pages right above the RAM slots, in the same 2 MiB tables.
                    let gpa = (3 << 20) + ((i * 3 + t) % 256) * 0x1000;
                    v.service_requests().unwrap();
                    let walk = match v.enter_guest() {
                        Ok(g) => g.walk(Gpa(gpa), Access::NONE),
                        Err(_) => continue,
                    };
                    let o = match walk {
                        HwWalk::Misconfig { .. } => v.handle_ept_misconfig(Gpa(gpa)),
                        HwWalk::Violation { .. } => {
                            v.handle_ept_violation(Gpa(gpa), FaultAccess::READ)
                        }
                        HwWalk::Translated { pfn, .. } => {
                            // A RAM slot at [2 MiB, 4 MiB) comes and goes.
                            assert_eq!(pfn.raw(), RAM_BASE_PFN + (gpa >> 12));
                            i += 1;
                            continue;
                        }
                        HwWalk::Broken { dump } => panic!("broken: {dump}"),
                    };
                    if let FaultOutcome::Emulate { gpa: got, .. } = o.unwrap() {
                        assert_eq!(got.raw() & !0xfff, gpa, "an MMIO exit emulated another gpa");
                    }
                    i += 1;
                }
            }));
        }
    }
    for round in 0..300u32 {
        let vm = &vms[(round % 2) as usize];
        vm.set_memory_region(&ram_slot(1, 0, 2 << 20, 2 << 20)).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(1, 0, 0, 0, 0)).unwrap();
        if round % 16 == 0 {
            vm.zap_all_fast();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a vCPU thread panicked");
    }
    drop(vms);
    assert_eq!(live_tables(&host), 0);
}
