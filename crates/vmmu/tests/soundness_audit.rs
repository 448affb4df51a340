//! Soundness review (audit 12c): safe call sequences that broke a precondition an `unsafe` block
//! of the core relies on. Safe code only.

#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vmmu::srcu::{ReaderFences, Srcu};

/// A cheap hash of the round: the threads' varying delays.
fn mix(x: u32) -> u32 {
    let x = x.wrapping_mul(0x9e37_79b9);
    x ^ (x >> 15)
}

/// Store-buffering litmus on the SRCU protocol. The reader opens a section and loads `data`;
/// the updater publishes the round's number in `data` and calls `synchronize`. A reader that saw
/// an older value must be waited for: `synchronize` may not return while its section is open.
/// That is what `MemslotSet::replace` (edits maps a reader may still read) and
/// `FrameAllocator::free_table` (frees a table a walker may still read) rely on. Returns in how
/// many of `rounds` rounds a grace period missed such a reader.
fn missed_grace_periods(fences: ReaderFences, rounds: u32) -> u32 {
    let srcu = Arc::new(Srcu::with_fences(2, fences));
    let data = Arc::new(AtomicU32::new(0));
    let arrived = Arc::new(AtomicU32::new(0));
    let synced = Arc::new(AtomicU32::new(0));
    let reader = {
        let (srcu, data, arrived, synced) =
            (srcu.clone(), data.clone(), arrived.clone(), synced.clone());
        std::thread::spawn(move || {
            let id = srcu.register().unwrap();
            let mut missed = 0;
            for round in 1..=rounds {
                // Both threads leave this barrier together, then each waits a varying while.
                arrived.fetch_add(1, Ordering::AcqRel);
                while arrived.load(Ordering::Acquire) < 2 * round {
                    std::hint::spin_loop();
                }
                for _ in 0..(mix(round) % 64) {
                    std::hint::spin_loop();
                }
                let g = srcu.read_lock(&id);
                if data.load(Ordering::Relaxed) < round {
                    // Still reading what was there before this round's publication: this
                    // round's grace period may not end before the section does.
                    for _ in 0..2_000 {
                        if synced.load(Ordering::Acquire) >= round {
                            missed += 1;
                            break;
                        }
                        std::hint::spin_loop();
                    }
                }
                drop(g);
            }
            missed
        })
    };
    let relax = vmmu::Spin;
    for round in 1..=rounds {
        arrived.fetch_add(1, Ordering::AcqRel);
        while arrived.load(Ordering::Acquire) < 2 * round {
            std::hint::spin_loop();
        }
        for _ in 0..(mix(round ^ 0x5555) % 64) {
            std::hint::spin_loop();
        }
        data.store(round, Ordering::Release);
        srcu.synchronize(&relax);
        synced.store(round, Ordering::Release);
    }
    reader.join().unwrap()
}

/// The SRCU guarantee the litmus checks, with full fences. The same litmus with
/// `ReaderFences::Asymmetric` around a function that does nothing, which safe code could build
/// until `ProcessBarrier` (commit df9292e), missed 16 to 144 readers in 20,000
/// rounds on a 2-core x86 machine; now only `unsafe` code can make such a barrier (the
/// `compile_fail` example on `vmmu::srcu::ProcessBarrier`).
#[test]
fn a_grace_period_never_misses_a_reader_that_saw_the_old_data() {
    assert_eq!(missed_grace_periods(ReaderFences::Full, 20_000), 0);
}

/// `Bug::LeafCacheIgnoresEpoch` makes the fast path read its cached level-1 table without the
/// epoch check, so after a zap has freed that table (grace period over) the read is a use after
/// free, sound only if the host keeps table memory mapped. Its doc said "never inject it with
/// another host", but nothing checked: `Vm::new` took the bug with any host, so a build with the
/// `historical-bugs` feature (features unify across a dependency graph) could reach the freed
/// read from safe code. Now `Vm::new` refuses it unless the host promises, in its `unsafe impl
/// FrameAllocator`, that freed table memory stays readable (`retains_table_memory`; the unit
/// test `vm::tests::leaf_cache_ignores_epoch_needs_a_host_that_keeps_table_memory`). The test
/// host does, and counts lookups of freed frames (debug builds look the frame up on every hit
/// made inside a section): the read below is still made, but counted instead of undefined.
/// Debug builds only: a release build does not look the frame up, so nothing counts the read.
#[cfg(all(feature = "historical-bugs", debug_assertions))]
#[test]
fn leaf_cache_ignores_epoch_reads_a_freed_table() {
    use vmmu::bugs::{Bug, BugSet};
    use vmmu::fault::FaultOutcome;
    use vmmu::spte::FormatKind;
    use vmmu::testing::TestHost;
    use vmmu::vm::{Vm, VmConfig};
    use vmmu::{AsId, FaultAccess, Gfn, Gpa};

    const X: u64 = 0x1234;
    let host = Arc::new(TestHost::new(16));
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.bugs = BugSet::only(Bug::LeafCacheIgnoresEpoch);
    let vm = Vm::new(cfg, host.clone()).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    let gpa = |g: u64| Gpa(g << 12);
    let n = vmmu::vcpu::mmio_cache::ENTRIES as u64;
    for g in X..=X + n {
        let o = v.handle_ept_violation(gpa(g), FaultAccess::READ).unwrap();
        assert!(matches!(o, FaultOutcome::Emulate { .. }), "setup: {o:?}");
    }
    // X's fast path walks and keeps X's level-1 table in the leaf-table cache.
    v.handle_ept_misconfig(gpa(X)).unwrap();
    // Unlink that table and free it after a grace period.
    let base = X & !511;
    vm.zap_gfn_range_for_tests(AsId(0), Gfn(base), Gfn(base + 512));
    vm.reclaim();
    assert_eq!(host.use_after_free(), 0, "setup");
    // X + ENTRIES missed the per-vCPU cache: the leaf-table cache answers, epoch ignored.
    let _ = v.handle_ept_misconfig(gpa(X + n));
    assert!(host.use_after_free() > 0, "the hit read the freed table");
}

/// Not undefined behaviour, but the guest-mode protocol the `unsafe` walks lean on: a guarded
/// entry on a vCPU already in raw guest mode used to set the mode bit a second time (a debug
/// assertion) and, on the guard's drop, clear it while the raw period went on, so remote TLB
/// flushes stopped waiting for a vCPU that was still walking. Now the guarded entry is a VM exit
/// and re-entry.
#[test]
fn a_guarded_entry_ends_a_raw_guest_mode_period_first() {
    use vmmu::spte::FormatKind;
    use vmmu::testing::TestHost;
    use vmmu::vm::{Vm, VmConfig};

    let host = Arc::new(TestHost::new(16));
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.service_requests().unwrap();
    v.enter_guest_mode().unwrap();
    assert!(v.in_guest_mode());
    let g = v.enter_guest().unwrap();
    drop(g);
    assert!(!v.in_guest_mode(), "the raw period ended with the guarded entry");
    // Consistent again: a raw period can begin and end.
    v.enter_guest_mode().unwrap();
    v.exit_guest_mode();
}

/// `ShadowMmu::stale_entries_for_tests` (feature `testing`, a safe `pub fn`) took the MMU core
/// whose host resolves the shadow pages' frames (then a `TdpMmu`) as a separate argument, and
/// trusted it to be the shadow MMU's own VM's. Given another VM's (`vm_b.mmu()` then), it read that
/// VM's table frames with the frame numbers of this VM's shadow pages, under this VM's shadow lock
/// only: no lock or read section of the other VM kept them allocated. With the other VM's tables
/// freed after their grace period, its test host (which keeps freed table memory) counted the reads
/// as uses after free (test 3cda201, fixed in 05691a5); a host that gives table memory back would
/// have been read after the free. Now the check is `Vm::stale_shadow_entries_for_tests`, which
/// pairs the VM's shadow MMU with its own core, and the `ShadowMmu` method is crate-private.
#[test]
fn stale_shadow_entries_for_tests_reads_only_its_own_vms_tables() {
    use common::shadow::{access, long4, shadow_vm, vcpu_in, Seen, Space, P, RW, US};
    use vmmu::bugs::BugSet;
    use vmmu::spte::FormatKind;

    // VM A: shadow paging, with shadow pages (root, PDPT, directory, table) and parent links.
    let (vm_a, host_a, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host_a, &next);
    s.map4k(0x40_0000, 0x20_0000, P | RW | US);
    let mut va = vcpu_in(&vm_a, long4(s.cr3));
    assert!(matches!(access(&mut va, 0x40_0000, false), Seen::Ram(_)), "setup");
    // VM B: TDP, on its own host; its vCPU maps RAM, then everything is zapped and freed.
    let (vm_b, host_b) = common::vm(FormatKind::Ept);
    vm_b.set_memory_region(&common::region(0, 0, 1 << 20, common::RAM_HVA, 0)).unwrap();
    {
        let mut vb = vm_b.create_vcpu().unwrap();
        common::access(&mut vb, 0x2000, false).unwrap();
    }
    vm_b.zap_all_fast();
    assert_eq!(host_b.tables_in_use(), 0, "setup: B's tables are freed");
    assert_eq!(host_b.use_after_free(), 0, "setup");

    assert_eq!(vm_a.stale_shadow_entries_for_tests(), Some(0));
    assert_eq!(vm_b.stale_shadow_entries_for_tests(), None, "B has no shadow MMU");
    assert_eq!(host_b.use_after_free(), 0, "nothing read B's freed frames");
    assert_eq!(host_a.use_after_free(), 0);
}

/// The test host whose `Sched::kick` panics while `panics` is set: a host callback that unwinds
/// out of the MMU in the middle of a zap.
struct KickPanics {
    host: vmmu::testing::TestHost,
    panics: std::sync::atomic::AtomicBool,
}

// SAFETY: every frame call is the test host's, whose `unsafe impl` makes the promises.
unsafe impl vmmu::host::FrameAllocator for KickPanics {
    fn type_stable_tables(&self) -> bool {
        self.host.type_stable_tables()
    }
    fn alloc_table(&self, init: u64) -> Option<vmmu::Pfn> {
        self.host.alloc_table(init)
    }
    unsafe fn free_table(&self, pfn: vmmu::Pfn) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.host.free_table(pfn) }
    }
    fn table(&self, pfn: vmmu::Pfn) -> Option<std::ptr::NonNull<vmmu::host::TableEntries>> {
        self.host.table(pfn)
    }
}

impl vmmu::host::HostMemory for KickPanics {
    fn translate(
        &self,
        hva: vmmu::Hva,
        access: vmmu::host::HostAccess,
    ) -> Result<vmmu::host::HostPage, vmmu::host::HostFault> {
        self.host.translate(hva, access)
    }
}

impl vmmu::host::Sched for KickPanics {
    fn kick(&self, _vcpu_index: usize) {
        assert!(!self.panics.load(Ordering::Relaxed), "the host's kick panics");
    }
}

/// Not undefined behaviour: a host callback (`Sched::kick`) that panics in the middle of a zap,
/// after the zap unlinked the tables and before their remote flush completed, unwinds with the
/// MMU lock and the VMM lock released. The unlinked tables were leaked then (session 52 queues
/// them as the zap unwinds, after making a TLB flush pending on every vCPU): none is freed while
/// the vCPU that was in guest mode can still walk them (it walks its emptied root), the next
/// reclaim after it left guest mode frees them, it flushes before it enters again, and the VM
/// goes on (faults, zaps, reclaim) with nothing leaked.
#[test]
fn a_kick_that_panics_in_a_zap_frees_the_unlinked_tables_only_after_the_vcpu_left() {
    use vmmu::fault::FaultOutcome;
    use vmmu::memslot::UserspaceMemoryRegion;
    use vmmu::spte::FormatKind;
    use vmmu::tdp::HwWalk;
    use vmmu::vm::{Vm, VmConfig};
    use vmmu::{Access, AsId, FaultAccess, Gfn, Gpa, Level};

    const RAM_HVA: u64 = 0x4000_0000;
    let host = Arc::new(KickPanics {
        host: vmmu::testing::TestHost::new(64),
        panics: std::sync::atomic::AtomicBool::new(false),
    });
    host.host.map(RAM_HVA, 1 << 20, RAM_HVA >> 12, Level::L4K, true);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, 0, 1 << 20, RAM_HVA)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let gpa = Gpa(0x2000);
    let translate = |v: &mut vmmu::vcpu::Vcpu<KickPanics>| {
        for _ in 0..10 {
            v.service_requests().unwrap();
            let walk = match v.enter_guest() {
                Ok(g) => g.walk(gpa, Access::NONE),
                Err(_) => continue,
            };
            match walk {
                HwWalk::Translated { pfn, .. } => return pfn,
                HwWalk::Violation { .. } => {
                    let o = v.handle_ept_violation(gpa, FaultAccess::READ).unwrap();
                    assert!(matches!(o, FaultOutcome::Fixed | FaultOutcome::Retry(_)), "{o:?}");
                }
                w => panic!("{w:?}"),
            }
        }
        panic!("no translation");
    };
    let pfn = translate(&mut v);
    let in_use = host.host.tables_in_use();
    assert_eq!(in_use, 4, "setup: root and three tables");

    // The vCPU is in guest mode when the zap unlinks its tables: the flush kicks it, and the
    // kick panics.
    v.enter_guest_mode().unwrap();
    host.panics.store(true, Ordering::Relaxed);
    let zap = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.zap_gfn_range_for_tests(AsId(0), Gfn(0), Gfn(1 << 27));
    }));
    host.panics.store(false, Ordering::Relaxed);
    assert!(zap.is_err(), "the kick panicked");
    // The vCPU's walk finds its root emptied; nothing it can reach was freed.
    assert!(matches!(v.walk(gpa, Access::NONE), HwWalk::Violation { present: false, .. }));
    assert_eq!(host.host.tables_in_use(), in_use, "a table freed under a vCPU in guest mode");
    v.exit_guest_mode();
    assert_eq!(vm.core().pending_free(), 3, "the three unlinked tables are queued");
    assert!(v.requests_pending(), "no TLB flush pending for the vCPU that may cache them");
    vm.reclaim();
    assert_eq!(host.host.tables_in_use(), in_use - 3, "freed after the grace period");
    // The locks were released: the VM goes on.
    assert_eq!(translate(&mut v), pfn);
    vm.zap_all_fast();
    drop(v);
    vm.zap_all_fast();
    assert_eq!(host.host.use_after_free(), 0);
    assert_eq!(host.host.tables_in_use(), 0, "every table freed, none leaked");
}

/// `Send`/`Sync` of `T`, seen from a concrete type: the inherent methods apply when `T` has the
/// trait, the fallback trait's otherwise (method resolution prefers inherent methods whose
/// bounds hold), as `vmmu::sync`'s own guard test does.
struct Probe<T: ?Sized>(std::marker::PhantomData<T>);
trait Fallback {
    fn is_send(&self) -> bool {
        false
    }
    fn is_sync(&self) -> bool {
        false
    }
}
impl<T: ?Sized> Fallback for Probe<T> {}
impl<T: ?Sized + Send> Probe<T> {
    fn is_send(&self) -> bool {
        true
    }
}
impl<T: ?Sized + Sync> Probe<T> {
    fn is_sync(&self) -> bool {
        true
    }
}

/// The thread-safety the `unsafe` code relies on, checked (second soundness review): an SRCU record has one
/// writer because a `ReaderId` is not `Sync` (so neither is a `Vcpu`, which holds two, nor a
/// read section's guard, which borrows one), and a section ends on the thread that opened it
/// because its guard is not `Send` (nor is a `GuestMode`, which holds the vCPU's table section);
/// a `Vcpu` with its leaf-table cache may move between threads. A new `unsafe impl` or field
/// that changed one of these would break an argument of the `SAFETY` comments.
#[test]
fn the_thread_safety_the_unsafe_code_relies_on() {
    use std::marker::PhantomData as P;
    use vmmu::memslot::MemslotsGuard;
    use vmmu::srcu::{ReadGuard, ReaderId};
    use vmmu::testing::TestHost;
    use vmmu::vcpu::{GuestMode, Vcpu};
    use vmmu::vm::Vm;

    assert!(Probe::<ReaderId>(P).is_send() && !Probe::<ReaderId>(P).is_sync());
    assert!(!Probe::<ReadGuard<'static>>(P).is_send());
    assert!(!Probe::<ReadGuard<'static>>(P).is_sync());
    assert!(!Probe::<MemslotsGuard<'static>>(P).is_send());
    assert!(!Probe::<MemslotsGuard<'static>>(P).is_sync());
    assert!(Probe::<Vcpu<TestHost>>(P).is_send() && !Probe::<Vcpu<TestHost>>(P).is_sync());
    assert!(!Probe::<GuestMode<'static, TestHost>>(P).is_send());
    assert!(!Probe::<GuestMode<'static, TestHost>>(P).is_sync());
    assert!(Probe::<Vm<TestHost>>(P).is_send() && Probe::<Vm<TestHost>>(P).is_sync());
    assert!(Probe::<Srcu>(P).is_sync() && Probe::<vmmu::memslot::MemslotSet>(P).is_sync());
}

/// The test host, but every translation claims a 2 MiB host mapping level with the frame the
/// test host gives: a host that breaks `HostPage::level`'s contract (the block around the
/// address backed by aligned contiguous frames) where its frames are not 2 MiB-congruent.
struct ClaimsHugePages(vmmu::testing::TestHost);

// SAFETY: every frame call is the test host's, whose `unsafe impl` makes the promises.
unsafe impl vmmu::host::FrameAllocator for ClaimsHugePages {
    fn type_stable_tables(&self) -> bool {
        self.0.type_stable_tables()
    }
    fn alloc_table(&self, init: u64) -> Option<vmmu::Pfn> {
        self.0.alloc_table(init)
    }
    unsafe fn free_table(&self, pfn: vmmu::Pfn) {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.free_table(pfn) }
    }
    fn table(&self, pfn: vmmu::Pfn) -> Option<std::ptr::NonNull<vmmu::host::TableEntries>> {
        self.0.table(pfn)
    }
}

impl vmmu::host::HostMemory for ClaimsHugePages {
    fn translate(
        &self,
        hva: vmmu::Hva,
        access: vmmu::host::HostAccess,
    ) -> Result<vmmu::host::HostPage, vmmu::host::HostFault> {
        let page = self.0.translate(hva, access)?;
        Ok(vmmu::host::HostPage { level: vmmu::Level::L2M, ..page })
    }
}

impl vmmu::host::Sched for ClaimsHugePages {}

/// A host that claims 2 MiB mappings for frames that are not 2 MiB-congruent (a buggy embedder)
/// gets the frames it named, one 4 KiB leaf each: no panic (the block's first frame was the
/// frame minus the gfn's offset in its block, which underflowed below frame 5), and no 2 MiB
/// leaf over frames the host never promised (the translation of every other page of the block
/// would have been made up, and a misaligned frame in a 2 MiB leaf sets its reserved bits).
#[test]
fn a_host_page_that_breaks_its_level_contract_is_mapped_as_the_one_frame_it_names() {
    use vmmu::memslot::UserspaceMemoryRegion;
    use vmmu::spte::FormatKind;
    use vmmu::tdp::HwWalk;
    use vmmu::vm::{Vm, VmConfig};
    use vmmu::{Access, FaultAccess, Gpa, Level, Pfn};

    const HVA: u64 = 0x4000_0000;
    const GPA: u64 = 0x20_0000;
    let test_host = vmmu::testing::TestHost::new(64);
    // Frames 0.. behind hva 0x4000_5000.., then frames 0x1003.. behind the slot's second MiB.
    test_host.map(HVA + 0x5000, 0x10_0000 - 0x5000, 0, Level::L4K, true);
    test_host.map(HVA + 0x10_0000, 0x10_0000, 0x1003, Level::L4K, true);
    let host = std::sync::Arc::new(ClaimsHugePages(test_host));
    for format in [FormatKind::Ept, FormatKind::Npt] {
        let vm = Vm::new(VmConfig::new(format, 46).unwrap(), host.clone()).unwrap();
        vm.set_memory_region(&UserspaceMemoryRegion::new(0, 0, GPA, 0x20_0000, HVA)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        v.service_requests().unwrap();
        for (gpa, pfn) in [(GPA + 0x5000, 0), (GPA + 0x7000, 2), (GPA + 0x10_0000, 0x1003)] {
            let o = v.handle_ept_violation(Gpa(gpa), FaultAccess::READ).unwrap();
            assert_eq!(o, vmmu::fault::FaultOutcome::Fixed, "{format:?} {gpa:#x}");
            v.enter_guest_mode().unwrap();
            match v.walk(Gpa(gpa), Access::NONE) {
                HwWalk::Translated { pfn: got, level, .. } => {
                    assert_eq!((got, level), (Pfn(pfn), Level::L4K), "{format:?} {gpa:#x}")
                }
                other => panic!("{format:?} {gpa:#x}: {other:?}"),
            }
            v.exit_guest_mode();
        }
        assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 3), "{format:?}");
    }
}
