//! Shadow fault-path behaviours that mutation testing (`cargo mutants` on `src/vcpu/shadow_fault.rs`,
//! `src/vcpu/shadow_path.rs` and `src/mmu_core`, audit 42m) found unpinned: each test names the
//! mutant it kills and shows the harm as a guest, the VMM or the host would see it (a wrong
//! translation, a stale MMIO decision, a wrong KVM counter, a wrong outcome of the public API),
//! never an internal flag.
#![cfg(not(loom))]

mod common;

use common::shadow::*;
use std::sync::Arc;
use vmmu::bugs::BugSet;
use vmmu::fault::{EmulateSource, PfErr};
use vmmu::guest::{GuestCpu, PagingMode};
use vmmu::host::TableEntries;
use vmmu::host::{FrameAllocator, HostAccess, HostFault, HostMemory, HostPage, Sched};
use vmmu::testing::TestHost;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Hva, Pfn};

/// Gva `A` maps frame `pd` (with `a_flags`), which is also the page directory through which the
/// guest maps `B` (its PDE names a page table that maps `B` to `DATA`). All written before the
/// guest runs. Returns the VM, the host, the CR3 and `pd`.
fn pd_aliased_at_a(a_flags: u64) -> (vmmu::vm::Vm<vmmu::testing::TestHost>, u64, u64) {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    let pd = alloc_table(&next);
    let pt = alloc_table(&next);
    s.map4k(A, pd, a_flags);
    let pdpte = s.entry_gpa(B, 3);
    host.write_u64(RAM_HVA + pdpte, pd | P | RW | US);
    host.write_u64(RAM_HVA + pd + ((B >> 21) & 511) * 8, pt | P | RW | US);
    host.write_u64(RAM_HVA + pt + ((B >> 12) & 511) * 8, DATA | P | RW | US);
    (vm, s.cr3, pd)
}

const A: u64 = 0x4000_0000;
const B: u64 = 0x8000_0000;
const DATA: u64 = 0x80_0000;

/// Shadow facts §3.1 (KVM `page_fault_handle_page_track`: `if (!fault->present ||
/// !fault->write) return false`): only a present WRITE to a guest page directory the MMU shadows
/// is emulated at once; a present READ fault on such a frame is fixed by mapping it. Here the
/// present read fault comes from a CR0.WP=0 supervisor write that made the leaf supervisor-only,
/// on a page that later became a page directory of the guest: a user read must map the page (the
/// guest reads its RAM), not exit to the emulator as a write-protected table write.
/// Kills `vcpu/shadow_fault.rs:199:13` and `:200:13` (`&&` -> `||` in the page-track check of
/// `shadow_slow`: the read was emulated, `EmulateSource::WriteProtected`).
#[test]
fn a_present_read_fault_on_a_shadowed_page_directory_maps_it() {
    let (a, b, data) = (A, B, DATA);
    let (vm, cr3, pd) = pd_aliased_at_a(P | US);
    let mut v = vcpu_in(&vm, GuestCpu { cr0_wp: false, ..long4(cr3) });
    // CR0.WP=0: the supervisor write makes `A`'s leaf writable and supervisor-only.
    assert_eq!(access_at(&mut v, a, true, false), Seen::Ram(ram_pfn(pd)));
    // `B` is reached through `pd`: the MMU shadows it (write-tracked, `A`'s leaf made read-only).
    assert_eq!(access(&mut v, b, false), Seen::Ram(ram_pfn(data)));
    // A user read of `A`: a present fault (the leaf is supervisor-only), fixed by a user leaf.
    let wp = v.stats.write_protected_emulations;
    assert_eq!(access(&mut v, a, false), Seen::Ram(ram_pfn(pd)));
    assert_eq!(v.stats.write_protected_emulations, wp, "a read is never a table-write emulation");
    // A user write there is the guest's protection #PF; a supervisor write to the table is
    // emulated (the MMU must see it).
    assert_eq!(access(&mut v, a, true), Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE | PfErr::USER));
    assert_eq!(
        access_at(&mut v, a + 8, true, false),
        Seen::Mmio(vmmu::Gpa(pd + 8), EmulateSource::WriteProtected)
    );
}

/// Shadow facts §3.1 and §3.3 (KVM `page_fault_handle_page_track` returns false for a
/// non-present fault; `make_spte` then installs the leaf read-only because the gfn is
/// write-tracked, and the write is emulated, RET_PF_WRITE_PROTECTED): a NOT-present write to a
/// page directory the MMU shadows is emulated after a read-only leaf was installed, so the
/// guest's next read of that page does not fault again.
/// Kills `vcpu/shadow_fault.rs:200:22` (`err.0 & PfErr::PRESENT` -> `|` and `^`: the present
/// check of the early page-track exit is lost, the write is emulated with no leaf installed,
/// and the read after it takes one more fault: `pf_taken` and `pf_fixed` higher than KVM's).
#[test]
fn a_not_present_write_to_a_shadowed_page_directory_leaves_a_read_only_leaf() {
    let (vm, cr3, pd) = pd_aliased_at_a(P | RW | US);
    let mut v = vcpu_in(&vm, long4(cr3));
    // `B` is reached through `pd`: the MMU shadows it. `A` has no leaf yet.
    assert_eq!(access(&mut v, B, false), Seen::Ram(ram_pfn(DATA)));
    assert_eq!(
        access(&mut v, A + 0x10, true),
        Seen::Mmio(vmmu::Gpa(pd + 0x10), EmulateSource::WriteProtected)
    );
    let (taken, fixed) = (v.stats.pf_taken, v.stats.pf_fixed);
    assert_eq!(access(&mut v, A + 0x10, false), Seen::Ram(ram_pfn(pd)));
    assert_eq!(
        (v.stats.pf_taken, v.stats.pf_fixed),
        (taken, fixed),
        "the read goes through the leaf the write installed"
    );
}

/// KVM `kvm_inject_emulated_page_fault` -> `pf_guest++` once per #PF given back to the guest
/// (shadow facts §3.1). Kills `vcpu/shadow_fault.rs:283:28` (`stats.pf_guest += 1` -> `-=`:
/// the counter wrapped to `u64::MAX` and its only check, `pf_guest >= 3`, held).
#[test]
fn each_guest_page_fault_counts_once_in_pf_guest() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, DATA, P | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, B, false), Seen::GuestPf(PfErr::USER));
    assert_eq!(v.stats.pf_guest, 1);
    assert_eq!(access(&mut v, A, true), Seen::GuestPf(PfErr::PRESENT | PfErr::WRITE | PfErr::USER));
    assert_eq!(v.stats.pf_guest, 2);
}

/// KVM `kvm_mmu_new_pgd` -> `fast_pgd_switch`: a root evicted from the previous-root cache
/// (`KVM_MMU_NUM_PREV_ROOTS` = 3) is freed (`kvm_mmu_free_roots`), which unpins its shadow page:
/// the next zap frees it. Here a 4-level guest cycles through six address spaces and then
/// leaves; after a zap of everything, every table frame the MMU took is back with the host.
/// Kills `vcpu/shadow_path.rs:368:12` (delete `!` in `load_cr3`'s `if !release.is_empty()`:
/// the evicted roots were never freed, their pages stayed pinned through every zap, and the
/// host lost their frames for the VM's life).
#[test]
fn roots_evicted_by_cr3_switches_give_their_frames_back() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let spaces: Vec<Space> = (0..6)
        .map(|i| {
            let s = Space::new(&host, &next);
            s.map4k(A, DATA + i * 0x1000, P | RW | US);
            s
        })
        .collect();
    let mut v = vcpu_in(&vm, long4(spaces[0].cr3));
    for _ in 0..2 {
        for (i, s) in spaces.iter().enumerate() {
            v.load_cr3(s.cr3).unwrap();
            assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(DATA + i as u64 * 0x1000)));
        }
    }
    drop(v);
    vm.zap_all_fast();
    vm.reclaim();
    assert_eq!(host.tables_in_use(), 0, "every shadow page was freed");
}

/// A host whose `alloc_table_below_4g` (a safe method) ignores its contract and hands out its
/// ordinary table frames, which the test host puts at 4 GiB and up (the first one exactly at
/// 4 GiB, pfn 0x10_0000).
struct LowTablesAreHigh {
    host: TestHost,
}

// SAFETY: every method forwards to the test host, whose `unsafe impl` makes the promises
// (`alloc_table_below_4g` returns one of its table frames, as its `alloc_table` does).
unsafe impl FrameAllocator for LowTablesAreHigh {
    fn alloc_table(&self, init: u64) -> Option<Pfn> {
        self.host.alloc_table(init)
    }
    fn alloc_table_below_4g(&self, init: u64) -> Option<Pfn> {
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

impl HostMemory for LowTablesAreHigh {
    fn translate(&self, hva: Hva, access: HostAccess) -> Result<HostPage, HostFault> {
        self.host.translate(hva, access)
    }
}

impl Sched for LowTablesAreHigh {}

/// `FrameAllocator::alloc_table_below_4g`'s contract: "The MMU checks this frame too ... and
/// refuses one at or above 4 GiB" (in PAE paging CR3 holds a 32-bit address; KVM allocates
/// `pae_root` with `__GFP_DMA32`). A PAE guest's special root on a host that hands out a frame
/// at exactly 4 GiB must fail as out of memory, with the frame given back and counted in
/// `tables_refused`, never loaded as the root the hardware would walk from a truncated CR3.
/// Kills `mmu_core/mod.rs:298:42` (`pfn.raw() < 1 << 20` -> `<=`) and `298:52` (`&&` -> `||`:
/// any frame the SPTE format can hold was accepted).
#[test]
fn a_special_root_frame_at_4_gib_is_refused() {
    let host = Arc::new(LowTablesAreHigh { host: TestHost::new(8) });
    let vm = Vm::new(VmConfig::shadow(46).unwrap(), host.clone()).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    v.set_guest_cpu(GuestCpu { mode: PagingMode::Pae { pdptrs: [0; 4] }, ..long4(0) }).unwrap();
    assert_eq!(v.service_requests().map(|_| ()), Err(vmmu::mmu_core::MmuError::NoTableBelow4G));
    assert_eq!(vm.stats().tables_refused, 1);
    assert_eq!(host.host.tables_in_use(), 0, "the refused frame went back to the host");
    assert_eq!(v.shadow_root_kind(), None);
}

/// The vCPU-side paths of the shadow MMU free zapped table pages in batches
/// (`MmuCore::reclaim_batched`: a grace period once 64 pages wait, not one per fault), and
/// `MmuCore::pending_free` tells the VMM how many wait. A guest that keeps recycling shadow
/// pages under the minimum page limit (64, `KVM_SET_NR_MMU_PAGES`) must not pile up the frames
/// of its zapped pages: the host gets them back in batches while the guest only faults, and the
/// frames the MMU holds are exactly its live shadow pages plus the waiting ones.
/// Kills `mmu_core/mod.rs:368:9` (`reclaim_batched` -> `()`: every recycled frame stayed with
/// the MMU until the VMM next zapped, ~240 here, four times the page limit), `368:43` (`>=` ->
/// `<`: a grace period after every fault that freed anything, nothing ever waiting), and
/// `375:9` (`pending_free` -> 0 and -> 1: a wrong figure for the VMM).
#[test]
fn recycled_shadow_pages_go_back_to_the_host_in_batches() {
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    vm.set_nr_mmu_pages(64).unwrap();
    let s = Space::new(&host, &next);
    // One guest page in each of 150 GiB-sized regions: two new shadow pages (a PD and a PT) each.
    for i in 1..=150u64 {
        s.map4k(i << 30, DATA, P | RW | US);
    }
    let mut v = vcpu_in(&vm, long4(s.cr3));
    let shadow = vm.shadow_mmu().unwrap();
    let mut waited = Vec::new();
    for i in 1..=150u64 {
        assert_eq!(access(&mut v, i << 30, false), Seen::Ram(ram_pfn(DATA)));
        let pending = vm.core().pending_free();
        assert_eq!(
            host.tables_in_use() as usize,
            shadow.pages_in_use() + pending,
            "the MMU's frames: its live shadow pages and those waiting for a grace period"
        );
        assert!(pending < 64 + 8, "{pending} frames wait after access {i}");
        waited.push(pending);
    }
    assert!(vm.stats().tables_freed > 150, "the recycled pages went back to the host");
    assert!(waited.iter().any(|&p| p > 1), "pages wait for a batch: {waited:?}");
    vm.reclaim();
    assert_eq!(vm.core().pending_free(), 0);
    assert_eq!(host.tables_in_use() as usize, shadow.pages_in_use());
}

/// KVM `kvm_flush_remote_tlbs` (`KVM_REQUEST_WAIT`, facts rule 4): a remote TLB flush returns
/// only once every vCPU that was in guest mode has left it or handled the flush, since its
/// caller (a zap, a host invalidation) goes on to free or reuse what the old translations
/// named. Here a vCPU in guest mode, on its own thread, takes a while to react to its kick (it
/// is "running the guest" through its TLB meanwhile): the flush must not return before it did.
/// Kills `mmu_core/mod.rs:419:25` (`wait == AckWait::Wait` -> `!=`: the flush returned right
/// after the kick, while the vCPU could still translate through its stale TLB).
#[test]
fn a_remote_tlb_flush_returns_after_the_vcpu_in_guest_mode_flushed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (vm, host, next) = shadow_vm(BugSet::NONE);
    let s = Space::new(&host, &next);
    s.map4k(A, DATA, P | RW | US);
    let mut v = vcpu_in(&vm, long4(s.cr3));
    assert_eq!(access(&mut v, A, false), Seen::Ram(ram_pfn(DATA)));
    v.service_requests().unwrap();
    v.enter_guest_mode().unwrap();
    let flushed = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let (v, flushed) = (&mut v, &flushed);
        sc.spawn(move || {
            while !v.requests_pending() {
                std::hint::spin_loop();
            }
            // The "IPI" arrived; the vCPU finishes what it was doing, then exits and flushes.
            std::thread::sleep(std::time::Duration::from_millis(50));
            flushed.store(true, Ordering::SeqCst);
            v.exit_guest_mode();
        });
        vm.flush_remote_tlbs_for_tests();
        assert!(flushed.load(Ordering::SeqCst), "the flush returned before the vCPU flushed");
    });
    assert_eq!(vm.stats().remote_tlb_flush, 1, "one vCPU had to be kicked");
}
