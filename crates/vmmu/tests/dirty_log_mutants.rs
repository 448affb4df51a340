//! Behaviour of the dirty-logging code that mutation testing (`cargo mutants` on `tdp/dirty.rs`,
//! the fault path's split in `tdp/map.rs`, huge-page recovery in `tdp/zap.rs`, `dirty/mod.rs`,
//! the memslot dirty bitmap, `shadow/dirty.rs`; session 39) found no test pinning. Each test
//! fails with the mutant its doc names applied, and shows what a guest, a VMM or the host would
//! see.
#![cfg(not(loom))] // std threads: loom types only work inside a model

mod common;

use common::{region, RAM_HVA};
use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use vmmu::fault::FaultOutcome;
use vmmu::host::HostAccess;
use vmmu::host::{FrameAllocator, HostFault, HostMemory, HostPage, Sched, TableEntries};
use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES as LOG;
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa, Hva, Level, Pfn, SlotId};

thread_local! {
    /// Armed on a thread: its next table allocation sends on the first channel, then waits on
    /// the second before it goes on.
    static PARK_AT_ALLOC: RefCell<Option<(Sender<()>, Receiver<()>)>> = const { RefCell::new(None) };
}

/// The test host, with a thread that can be parked inside a table allocation (the one a write
/// fault's split of a read-only huge leaf makes before its compare-and-swap), so another vCPU
/// can win the race for the same leaf, deterministically.
struct ParkingHost {
    host: TestHost,
}

// SAFETY: every frame call is the test host's, whose `unsafe impl` makes the promises; parking
// only delays an allocation.
unsafe impl FrameAllocator for ParkingHost {
    fn type_stable_tables(&self) -> bool {
        self.host.type_stable_tables()
    }
    fn retains_table_memory(&self) -> bool {
        self.host.retains_table_memory()
    }
    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        if let Some((reached, go)) = PARK_AT_ALLOC.with(|p| p.borrow_mut().take()) {
            reached.send(()).unwrap();
            go.recv().unwrap();
        }
        self.host.alloc_table(init)
    }
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
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

impl HostMemory for ParkingHost {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        self.host.translate(hva, access)
    }
    fn translate_mapped_writable(&self, hva: Hva) -> Option<Pfn> {
        self.host.translate_mapped_writable(hva)
    }
    fn mapping_level(&self, hva: Hva) -> Option<Level> {
        self.host.mapping_level(hva)
    }
}

impl Sched for ParkingHost {
    fn kick(&self, vcpu_index: usize) {
        self.host.kick(vcpu_index)
    }
    fn relax(&self) {
        self.host.relax()
    }
}

/// One EPT guest access to completion on any host; returns the frame and the number of faults.
fn ept_access<H: vmmu::host::Host>(v: &mut Vcpu<H>, gpa: u64, write: bool) -> (Pfn, usize) {
    let need = if write { Access::WRITE } else { Access::NONE };
    let mut faults = 0;
    for _ in 0..1000 {
        v.service_requests().expect("root");
        let walk = match v.enter_guest() {
            Ok(g) => g.walk(Gpa(gpa), need),
            Err(_) => continue,
        };
        match walk {
            HwWalk::Translated { pfn, .. } => return (pfn, faults),
            HwWalk::Violation { .. } => {
                faults += 1;
                let a = if write { FaultAccess::WRITE } else { FaultAccess::READ };
                let o = v.handle_ept_violation(Gpa(gpa), a).unwrap();
                assert!(!matches!(o, FaultOutcome::Emulate { .. }), "{gpa:#x} is RAM");
            }
            other => panic!("unexpected walk {other:?}"),
        }
    }
    panic!("access to {gpa:#x} did not complete");
}

/// Two vCPUs write two pages of one read-only 2 MiB leaf of a logged slot (logging started when
/// no table page could be had, so the leaf was write-protected whole) at the same time: each
/// fault splits the leaf into a table of children (`split_for_fault`), and the one whose
/// compare-and-swap loses gives its table back (`discard_split`) and faults again. Here vCPU A
/// is parked inside its split's table allocation while vCPU B's split wins, deterministically
/// (the loom model `loom_huge_page::two_write_faults_split_one_read_only_2m_leaf` explores the
/// same race, but the regular suite did not have it). Both writes are in the GET, and nothing
/// else; the host has one table page more in use (the winner's), and the
/// VM's `pages_4k` statistic (KVM's binary stat) counts the 512 leaves of the one table linked.
/// Kills `discard_split` -> `()` (the lost table page leaked: one host page per lost race, for
/// the life of the host; its 512 leaves stayed counted) and `discard_split`'s `-1` -> `1`
/// (delete `-`: `pages_4k` counted 1536 leaves for 512).
#[test]
fn a_write_fault_that_loses_the_split_race_gives_its_table_back() {
    let host = Arc::new(ParkingHost { host: TestHost::new(64) });
    host.host.map(RAM_HVA, 1 << 30, RAM_HVA >> 12, Level::L2M, true);
    host.host.set_zero_page_reads(false);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    let base = 0x20_0000u64;
    let frame0 = RAM_HVA >> 12;
    vm.set_memory_region(&region(1, base, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut a = vm.create_vcpu().unwrap();
    let mut b = vm.create_vcpu().unwrap();
    assert_eq!(ept_access(&mut a, base, true), (Pfn(frame0), 1), "setup");
    assert_eq!(ept_access(&mut b, base, false).1, 0, "setup: b's root sees the 2 MiB leaf");
    host.host.set_fail_alloc(true);
    vm.set_memory_region(&region(1, base, 0x20_0000, RAM_HVA, LOG)).unwrap();
    host.host.set_fail_alloc(false);
    let s = vm.stats();
    assert_eq!((s.pages_2m, s.pages_4k), (1, 0), "setup: the 2 MiB leaf stayed, read-only");
    let tables = host.host.tables_in_use();

    // A's write fault at page 5 parks in its split's table allocation, before its exchange.
    let (reached_tx, reached_rx) = channel();
    let (go_tx, go_rx) = channel();
    let t = std::thread::spawn(move || {
        PARK_AT_ALLOC.with(|p| *p.borrow_mut() = Some((reached_tx, go_rx)));
        let r = ept_access(&mut a, base + 0x5000, true);
        (a, r)
    });
    reached_rx.recv().unwrap();
    // Meanwhile B writes page 6: its split wins the exchange.
    assert_eq!(ept_access(&mut b, base + 0x6000, true), (Pfn(frame0 + 6), 1));
    go_tx.send(()).unwrap();
    let (mut a, (pfn, faults)) = t.join().unwrap();
    assert_eq!(pfn, Pfn(frame0 + 5));
    assert!(faults >= 1, "A's write faulted");
    assert!(vm.stats().tables_freed >= 1, "setup: A lost the exchange and gave its table back");

    // The guest: every other page of the block still reads without a fault, and only the two
    // written pages are dirty.
    for page in [0u64, 1, 7, 0x1ff] {
        assert_eq!(ept_access(&mut a, base + (page << 12), false), (Pfn(frame0 + page), 0));
    }
    let log = vm.get_dirty_log(AsId(0), SlotId(1)).unwrap();
    assert_eq!(vmmu::dirty::pages_of(&log).collect::<Vec<_>>(), [5, 6]);
    // The VMM's statistics: one split table of 512 4 KiB leaves.
    let s = vm.stats();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 512), "pages_2m/pages_4k after one split");

    // The host: one table page more than before, the one linked; the loser's went back.
    assert_eq!(host.host.tables_in_use(), tables + 1, "a table page leaked");
    drop((a, b));
    vm.reclaim();
    assert_eq!(host.host.use_after_free(), 0, "a table page was read after its free");
}

/// Guest-physical base of a 1 GiB slot, and the host address of the 1 GiB host page behind it.
const SLOT_1G: u64 = 1 << 30;
const HVA_1G: u64 = 1 << 32;

/// When dirty logging stops on a slot that one 1 GiB host page backs, the TDP MMU puts one
/// 1 GiB leaf back (KVM `kvm_mmu_recover_huge_pages`: the walk meets the 1 GiB-level entry
/// first, `kvm_mmu_max_mapping_level` allows 1 GiB, and `make_huge_spte` builds the leaf from
/// the first present leaf under it, frame aligned down), even when the pages the guest touched
/// while logging all lie past the first 2 MiB block. Every page then translates to its own
/// frame without a fault. Kills, in `first_present_leaf`, `at = i * level.pages()` -> `i /
/// level.pages()` and `at + below` -> `at - below` / `at * below`, and in `leaves_at_place`,
/// `first + i * level.pages()` -> `first + i / level.pages()`: each made the 1 GiB candidate's
/// first frame or place check wrong below a 2 MiB-level table whose index is not 0, so the
/// recovery fell back to 2 MiB leaves (`pages_1g` 0, `pages_2m` 512, the guest's TLB reach
/// 512 times smaller), unlike KVM.
#[test]
fn stopping_logging_recovers_a_1g_leaf_from_leaves_past_the_first_2m_block() {
    let host = TestHost::new(1100);
    host.map(HVA_1G, 1 << 30, HVA_1G >> 12, Level::L1G, true);
    let host = Arc::new(host);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    vm.set_memory_region(&region(1, SLOT_1G, 1 << 30, HVA_1G, LOG)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let frame0 = HVA_1G >> 12;
    for page in [0x205u64, 0x3_ffff, 0x1_2345] {
        assert_eq!(ept_access(&mut v, SLOT_1G + (page << 12), true), (Pfn(frame0 + page), 1));
    }
    let s = vm.stats();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (0, 0, 3), "setup: logged at 4 KiB");
    vm.set_memory_region(&region(1, SLOT_1G, 1 << 30, HVA_1G, 0)).unwrap();
    let s = vm.stats();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (1, 0, 0), "one 1 GiB leaf, as KVM");
    for page in [0u64, 0x205, 0x1_2345, 0x2_0000, 0x3_ffff] {
        let gpa = SLOT_1G + (page << 12);
        assert_eq!(ept_access(&mut v, gpa, false), (Pfn(frame0 + page), 0), "{page:#x}");
    }
}

/// A host whose `mapping_level` says one 1 GiB page backs [`HVA_1G`]'s GiB, while `translate`
/// names frames that only partly agree: 2 MiB block 0 is frames `0x80000..` (which is also where
/// a 1 GiB page at `0x80000` would put it), block 1 is frames `0xa0000..` (one aligned 2 MiB
/// run, not the 1 GiB page's), and block 2 is frames `0xc0000..` except its page 2, which is
/// `0xe0002`. Every block past 2 is frames `0x20000 + k`, never touched here. None of these is
/// a table frame of the test host (`0xffff0` and up), as `FrameAllocator`'s contract asks.
struct PatchworkHost {
    host: TestHost,
}

impl PatchworkHost {
    fn frame_of(page: u64) -> Pfn {
        Pfn(match page {
            0..512 => 0x8_0000 + page,
            512..1024 => 0xa_0000 + (page - 512),
            1026 => 0xe_0002,
            1024..1536 => 0xc_0000 + (page - 1024),
            _ => 0x2_0000 + page,
        })
    }
}

common::test_host_frames!(PatchworkHost);

impl HostMemory for PatchworkHost {
    fn translate(&self, hva: Hva, _access: HostAccess) -> Result<HostPage, HostFault> {
        let off = hva.raw().checked_sub(HVA_1G).filter(|&o| o < 1 << 30);
        let page = off.ok_or(HostFault::Unmapped(hva))? >> 12;
        Ok(HostPage { pfn: Self::frame_of(page), writable: true, level: Level::L4K })
    }
    fn mapping_level(&self, hva: Hva) -> Option<Level> {
        let inside = hva.raw().checked_sub(HVA_1G).is_some_and(|o| o < 1 << 30);
        inside.then_some(Level::L1G)
    }
}

impl Sched for PatchworkHost {}

/// Huge-page recovery when dirty logging stops, under a host whose `mapping_level` promises a
/// 1 GiB page that its `translate` does not give (see [`PatchworkHost`]): the recovery must
/// keep every gfn on the frame the host named for it, putting back only the huge leaves whose
/// every present leaf maps its place in one aligned block (the 1 GiB candidate fails, as does
/// block 2; blocks 0 and 1 become 2 MiB leaves), and the vCPUs must be told to flush, since
/// tables went. Kills, in `recover_in_table`, `first & (span - 1) != 0 || !leaves_at_place(..)`
/// -> `&&` (the 1 GiB candidate's first frame is aligned, so its leaves went unchecked: one
/// 1 GiB leaf moved page 513 from frame 0xa0001 to 0x80201, a frame the host never named for
/// it) and the fallback recursion's `flush |=` -> `&=` (the 2 MiB leaves replaced two tables
/// and nobody was asked to flush: a vCPU could keep walking through a table page about to be
/// freed and reused).
#[test]
fn recovery_under_a_host_that_overstates_its_page_size_keeps_every_named_frame() {
    let host = Arc::new(PatchworkHost { host: TestHost::new(64) });
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    vm.set_memory_region(&region(1, SLOT_1G, 1 << 30, HVA_1G, LOG)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    let f = PatchworkHost::frame_of;
    let touched = [1u64, 513, 1025, 1026];
    for page in touched {
        assert_eq!(ept_access(&mut v, SLOT_1G + (page << 12), true), (f(page), 1), "{page}");
    }
    v.service_requests().unwrap();
    let flushes = vm.stats().remote_tlb_flush_requests;
    vm.set_memory_region(&region(1, SLOT_1G, 1 << 30, HVA_1G, 0)).unwrap();
    let s = vm.stats();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (0, 2, 2), "blocks 0 and 1 recovered");
    assert!(s.remote_tlb_flush_requests > flushes, "tables went without a remote flush");
    assert!(v.service_requests().unwrap().flush_tlb, "the vCPU was not asked to flush");
    for page in touched.into_iter().chain([0, 2, 511, 512, 1023, 1027]) {
        let gpa = SLOT_1G + (page << 12);
        assert_eq!(ept_access(&mut v, gpa, false).0, f(page), "page {page}: not the named frame");
    }
}

/// `MemslotSet::mark_page_dirty` (a safe public entry point: KVM `mark_page_dirty_in_slot`)
/// given a gfn outside the slot it names marks nothing: not the bit at the gfn's distance from
/// the slot's base, which for a gfn of the next slot is a bit past this slot's end, which
/// `KVM_GET_DIRTY_LOG` (the bitmap's words) would report as a page the slot does not have (KVM
/// never returns a bit past `npages`). Kills `set.rs` `mark_page_dirty`'s early return
/// `base != || !logging || !contains` with either `||` -> `&&` (the containment test then
/// never decided for a gfn outside; with the first, a stale copy of a moved slot marked the
/// page of the slot's new place that holds the gfn, a page nobody wrote since).
#[test]
fn marking_a_gfn_outside_the_named_slot_marks_nothing() {
    use vmmu::memslot::{Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion};
    use vmmu::Gfn;
    let m = Memslots::new(MemslotsConfig::default());
    let r = m.register_reader().unwrap();
    for (id, gpa) in [(1, 0x10_0000), (2, 0x11_0000)] {
        let reg = UserspaceMemoryRegion::new(id, LOG, gpa, 0x1_0000, RAM_HVA + gpa);
        m.set_memory_region(&reg, &NoHooks).unwrap();
    }
    {
        let g = m.read(&r);
        let set = g.set(AsId(0));
        let slot1 = *set.get(SlotId(1)).unwrap();
        set.mark_page_dirty(&slot1, Gfn(0x112)); // a page of slot 2, not of slot 1
        set.mark_page_dirty(&slot1, Gfn(0x103)); // slot 1's page 3
    }
    let g = m.read(&r);
    let pages = |id| {
        vmmu::dirty::pages_of(&g.set(AsId(0)).dirty_bitmap(SlotId(id)).unwrap().snapshot())
            .collect::<Vec<_>>()
    };
    assert_eq!(pages(1), [3], "slot 1 (16 pages) reports a page past its end");
    assert_eq!(pages(2), [] as [u64; 0]);
    drop(g);
    // A copy of slot 3 from before it moved 8 pages up: gfn 0x40a was its page 10 and is now
    // page 2. The stale copy marks nothing (rather than page 2, which nobody wrote since).
    let reg3 = |gpa| UserspaceMemoryRegion::new(3, LOG, gpa, 0x1_0000, RAM_HVA + 0x40_0000);
    m.set_memory_region(&reg3(0x40_0000), &NoHooks).unwrap();
    let stale = *m.read(&r).set(AsId(0)).get(SlotId(3)).unwrap();
    m.set_memory_region(&reg3(0x40_8000), &NoHooks).unwrap();
    m.read(&r).set(AsId(0)).mark_page_dirty(&stale, Gfn(0x40a));
    let g = m.read(&r);
    let log3 = g.set(AsId(0)).dirty_bitmap(SlotId(3)).unwrap().snapshot();
    assert_eq!(vmmu::dirty::pages_of(&log3).count(), 0, "a stale copy marked {log3:x?}");
}

/// `Memslots::dirty_bitmap_bytes`: what a logging slot's bitmap costs, as KVM counts it (two
/// buffers of `ALIGN(npages, 64) / 8` bytes each), and nothing for a slot that does not log.
/// Kills `dirty_bitmap_bytes -> None / Some(0) / Some(1)` (no test called it).
#[test]
fn a_logging_slots_bitmap_costs_what_kvm_allocates() {
    use vmmu::memslot::{Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion};
    let m = Memslots::new(MemslotsConfig::default());
    let logged = UserspaceMemoryRegion::new(1, LOG, 0x10_0000, 0x41_000, RAM_HVA); // 65 pages
    m.set_memory_region(&logged, &NoHooks).unwrap();
    let plain = UserspaceMemoryRegion::new(2, 0, 0x20_0000, 0x1000, RAM_HVA);
    m.set_memory_region(&plain, &NoHooks).unwrap();
    assert_eq!(m.dirty_bitmap_bytes(AsId(0), SlotId(1)), Some(2 * 2 * 8));
    assert_eq!(m.dirty_bitmap_bytes(AsId(0), SlotId(2)), None);
}
