//! Dirty logging through the VM's ioctls and real guest writes (issue 16 points 1-2): which pages
//! a GET returns, that auto mode re-protects and flushes (a vCPU writing through a cached
//! writable translation after a GET faults again and is in the next GET), manual protect, and
//! KVM's errnos in KVM's order.
#![cfg(not(loom))]

mod common;

use common::{region, vm, vm_with, RAM_HVA};
use std::collections::HashMap;
use vmmu::bugs::BugSet;
use vmmu::dirty::{pages_of, DirtyLogMode};
use vmmu::fault::FaultOutcome;
use vmmu::memslot::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use vmmu::spte::FormatKind;
use vmmu::tdp::HwWalk;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::{Vm, VmConfig};
use vmmu::{Access, AsId, FaultAccess, Gpa, Pfn, SlotId};

const GPA: u64 = 0x10_0000;
const LOG: u32 = KVM_MEM_LOG_DIRTY_PAGES;

/// A vCPU with a TLB that caches translations with their write right, as the hardware does:
/// it stays in guest mode between accesses only in the caller's imagination (it exits after
/// each access and keeps its TLB; only a flush request empties it).
struct TlbVcpu {
    vcpu: Vcpu<TestHost>,
    tlb: HashMap<u64, (Pfn, bool)>,
}

impl TlbVcpu {
    fn new(vm: &Vm<TestHost>) -> Self {
        TlbVcpu { vcpu: vm.create_vcpu().unwrap(), tlb: HashMap::new() }
    }

    /// One guest access to completion; returns how many faults it took.
    fn access(&mut self, gpa: u64, write: bool) -> usize {
        let need = if write { Access::WRITE } else { Access::NONE };
        let mut faults = 0;
        for _ in 0..100 {
            if self.vcpu.service_requests().unwrap().flush_tlb {
                self.tlb.clear();
            }
            if let Some(&(_, w)) = self.tlb.get(&(gpa >> 12)) {
                if w || !write {
                    return faults; // a TLB hit: no walk, no fault
                }
            }
            let walk = match self.vcpu.enter_guest() {
                Ok(g) => g.walk(Gpa(gpa), need),
                Err(_) => continue,
            };
            match walk {
                HwWalk::Translated { pfn, perms, .. } => {
                    self.tlb.insert(gpa >> 12, (pfn, perms.contains(Access::WRITE)));
                    return faults;
                }
                HwWalk::Violation { .. } => {
                    faults += 1;
                    let a = if write { FaultAccess::WRITE } else { FaultAccess::READ };
                    let o = self.vcpu.handle_ept_violation(Gpa(gpa), a).unwrap();
                    assert!(!matches!(o, FaultOutcome::Emulate { .. }), "{gpa:#x} is RAM");
                }
                other => panic!("unexpected walk {other:?}"),
            }
        }
        panic!("access to {gpa:#x} did not complete");
    }
}

fn get(vm: &Vm<TestHost>, id: u16) -> Vec<u64> {
    pages_of(&vm.get_dirty_log(AsId(0), SlotId(id)).unwrap()).collect()
}

fn ept(bugs: BugSet) -> (Vm<TestHost>, std::sync::Arc<TestHost>) {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.bugs = bugs;
    vm_with(cfg)
}

/// The test of issue 16 point 2: after a GET, a vCPU whose TLB holds a writable translation of
/// a page the GET took must fault on its next write, and the page must be in the next GET. Fails
/// if the GET does not write-protect the leaf, or does not flush the TLBs.
fn write_through_cached_translation_after_get(bugs: BugSet) -> Vec<u64> {
    let (vm, _h) = ept(bugs);
    vm.set_memory_region(&region(1, GPA, 0x10000, RAM_HVA, LOG)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(GPA + 0x3000, true), 1, "first write faults (read-only or absent)");
    assert_eq!(v.access(GPA + 0x3008, true), 0, "second write hits the TLB");
    assert_eq!(get(&vm, 1), [3]);
    v.access(GPA + 0x3010, true);
    get(&vm, 1)
}

#[test]
fn a_write_through_a_cached_translation_after_get_is_in_the_next_get() {
    assert_eq!(write_through_cached_translation_after_get(BugSet::NONE), [3]);
}

// With the flush removed (`Bug::DirtyLogNoFlush`), `tests/catchers` shows the lost page.

#[test]
fn only_guest_writes_to_logged_slots_dirty_pages() {
    let (vm, h) = vm(FormatKind::Npt);
    h.set_zero_page_reads(true);
    vm.set_memory_region(&region(1, GPA, 0x8000, RAM_HVA, LOG)).unwrap();
    vm.set_memory_region(&region(2, 0x20_0000, 0x8000, RAM_HVA, 0)).unwrap();
    let ro = LOG | KVM_MEM_READONLY;
    vm.set_memory_region(&region(3, 0x30_0000, 0x8000, RAM_HVA, ro)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    common::access(&mut v, GPA + 0x1000, false).unwrap();
    common::access(&mut v, GPA + 0x2000, true).unwrap();
    common::access(&mut v, GPA + 0x2000, true).unwrap();
    // The alias without logging and the read-only alias: nothing of slot 1 gets dirty.
    common::access(&mut v, 0x20_0000 + 0x5000, true).unwrap();
    common::access(&mut v, 0x30_0000 + 0x6000, true).unwrap();
    common::access(&mut v, GPA + 0x7000, true).unwrap();
    assert_eq!(get(&vm, 1), [2, 7]);
    assert_eq!(get(&vm, 1), [] as [u64; 0], "auto mode cleared them");
    assert_eq!(get(&vm, 3), [] as [u64; 0], "read-only: writes are MMIO");
    assert_eq!(vm.get_dirty_log(AsId(0), SlotId(2)).unwrap_err().errno(), "ENOENT");
    // After the GET, a write to a taken page faults again and is logged again.
    common::access(&mut v, GPA + 0x2000, true).unwrap();
    assert_eq!(get(&vm, 1), [2]);
    assert!(vm.stats().dirty_log_protected >= 3);
}

/// KVM maps a read fault writable when the host page is writable already (written before, by
/// anyone), and a writable leaf in a logged slot dirties its page: real KVM reports such a read.
/// A read of a page nobody wrote (the zero page) dirties nothing.
#[test]
fn a_read_that_maps_a_written_page_writable_dirties_it() {
    let (vm, h) = vm(FormatKind::Ept);
    h.set_zero_page_reads(true);
    vm.set_memory_region(&region(1, GPA, 0x8000, RAM_HVA, LOG)).unwrap();
    vm.set_memory_region(&region(2, 0x20_0000, 0x8000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    // Page 4 is written through the alias without logging; page 5 is only read.
    common::access(&mut v, 0x20_0000 + 0x4000, true).unwrap();
    common::access(&mut v, GPA + 0x4000, false).unwrap();
    common::access(&mut v, GPA + 0x5000, false).unwrap();
    assert_eq!(get(&vm, 1), [4]);
    h.set_zero_page_reads(false);
    common::access(&mut v, GPA + 0x6000, false).unwrap();
    assert_eq!(get(&vm, 1), [6], "a host that maps reads writable: every first read dirties");
}

#[test]
fn manual_mode_keeps_bits_until_cleared_and_clear_reprotects() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    // 130 pages: two full words and a tail of 2.
    vm.set_memory_region(&region(1, GPA, 130 << 12, RAM_HVA, LOG)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    for p in [0u64, 63, 64, 129] {
        v.access(GPA + (p << 12), true);
    }
    assert_eq!(get(&vm, 1), [0, 63, 64, 129]);
    assert_eq!(get(&vm, 1), [0, 63, 64, 129], "manual GET clears nothing");
    // Pages stay writable until cleared: no fault, nothing new.
    assert_eq!(v.access(GPA + 0x40, true), 0);
    let clear = |first, count, bm: &[u64]| vm.clear_dirty_log(AsId(0), SlotId(1), first, count, bm);
    clear(0, 64, &[1]).unwrap();
    assert_eq!(get(&vm, 1), [63, 64, 129]);
    clear(128, 2, &[u64::MAX]).unwrap();
    assert_eq!(get(&vm, 1), [63, 64]);
    // The cleared page 0 was write-protected and flushed: the next write faults and logs it.
    assert_eq!(v.access(GPA + 0x80, true), 1);
    assert_eq!(get(&vm, 1), [0, 63, 64]);
}

/// KVM's order (`make_spte`): a fault that maps a page writable marks it before it installs the
/// leaf. A GET takes no MMU lock, so it can run while a fault sits between its install and the
/// end of its lock hold; another vCPU can meanwhile write through the new leaf and finish. That
/// write completed before the GET, so the GET must report the page. vCPU 0's write fault stops
/// right after its install (`PreemptPoint::FaultInstalled`); there vCPU 1 writes the page (its
/// hardware walk translates writable) and the GET runs. (With the mark after the install, as
/// this MMU had it, that GET misses the page: the copy the VMM makes for it is stale, a lost
/// dirty page that the soak of `vmmu run --dirty-log initially-set --guest-paging` found.)
#[test]
fn a_write_through_a_leaf_a_fault_just_installed_is_in_the_get_after_it() {
    use vmmu::host::PreemptPoint;
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    vm.set_memory_region(&region(1, GPA, 4 << 12, RAM_HVA, LOG)).unwrap();
    let mut v0 = TlbVcpu::new(&vm);
    let mut v1 = TlbVcpu::new(&vm);
    // Page 0 mapped writable and logged, then collected: its leaf is read-only, its bit clear.
    v0.access(GPA, true);
    v1.access(GPA, false);
    assert_eq!(get(&vm, 1), [0]);
    vm.clear_dirty_log_all(AsId(0), SlotId(1), 0, 4).unwrap();
    assert_eq!(get(&vm, 1), [] as [u64; 0]);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (racer, out) = (vm.clone(), seen.clone());
    let mut v1 = Some(v1.vcpu);
    vmmu::testing::preempt::on_this_thread(Some(Box::new(move |p| {
        if p != PreemptPoint::FaultInstalled {
            return;
        }
        let Some(mut v) = v1.take() else { return };
        // vCPU 1 in guest mode: its hardware walk finds the leaf vCPU 0's fault just installed.
        v.service_requests().unwrap();
        let walk = v.enter_guest().unwrap().walk(Gpa(GPA), Access::WRITE);
        let wrote =
            matches!(walk, HwWalk::Translated { perms, .. } if perms.contains(Access::WRITE));
        v.exit_guest_mode();
        // Its write is done; now the VMM collects.
        *out.lock().unwrap() = Some((wrote, get(&racer, 1)));
    })));
    let faults = v0.access(GPA + 8, true);
    vmmu::testing::preempt::on_this_thread(None);
    assert_eq!(faults, 1, "the write faults on the read-only leaf");
    let (wrote, got) = seen.lock().unwrap().take().expect("the fault reached its install");
    assert!(wrote, "vCPU 1 writes through the new leaf");
    assert_eq!(got, [0], "the GET after vCPU 1's write reports the page");
}

/// A CLEAR write-protects exactly the pages of its bitmap, one walk per 64 pages: a slot whose
/// first page is not 64-aligned, a word whose pages straddle two leaf tables (gfn 0x200), the
/// short last word, and the next slot's first page right after it, which keeps its write right.
/// Aimed at `write_protect_table`'s range and bit arithmetic (the bits under an entry,
/// the slot's end).
#[test]
fn clear_protects_exactly_its_pages_across_leaf_tables() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    let (g1, n1) = (0x1e5_000u64, 200u64); // gfn 0x1e5..0x2ad: page 27 is gfn 0x200
    let g2 = g1 + (n1 << 12);
    vm.set_memory_region(&region(1, g1, n1 << 12, RAM_HVA + g1, LOG)).unwrap();
    vm.set_memory_region(&region(2, g2, 8 << 12, RAM_HVA + g2, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    for p in 0..n1 {
        assert_eq!(v.access(g1 + (p << 12), true), 1, "page {p}: the first write faults");
    }
    assert_eq!(v.access(g2, true), 1);
    let bits = |ps: &[u64]| ps.iter().fold(0u64, |m, p| m | 1 << p);
    vm.clear_dirty_log(AsId(0), SlotId(1), 0, 64, &[bits(&[0, 26, 27, 63])]).unwrap();
    vm.clear_dirty_log(AsId(0), SlotId(1), 192, 8, &[u64::MAX]).unwrap();
    for p in [0u64, 26, 27, 63, 192, 199] {
        assert_eq!(v.access(g1 + (p << 12), true), 1, "page {p} was cleared: write-protected");
    }
    for p in [1u64, 25, 28, 62, 64, 191] {
        assert_eq!(v.access(g1 + (p << 12), true), 0, "page {p} was not cleared: still writable");
    }
    assert_eq!(v.access(g2, true), 0, "the next slot's first page keeps its write right");
    let want: Vec<u64> = (0..n1).filter(|p| !(193..=198).contains(p)).collect();
    assert_eq!(get(&vm, 1), want, "cleared and not written again: 193..=198 only");
}

#[test]
fn errnos_in_kvms_order() {
    let mut cfg = VmConfig::new(FormatKind::Ept, 46).unwrap();
    cfg.nr_address_spaces = 2;
    let (vm, _h) = vm_with(cfg);
    vm.set_memory_region(&region(1, GPA, 200 << 12, RAM_HVA, LOG)).unwrap();
    vm.set_memory_region(&region(2, 0x100_0000, 0x1000, RAM_HVA, 0)).unwrap();
    fn e<T: std::fmt::Debug>(r: Result<T, vmmu::dirty::DirtyLogError>) -> &'static str {
        r.unwrap_err().errno()
    }
    let get = |a, id| vm.get_dirty_log(AsId(a), SlotId(id));
    assert_eq!(e(get(2, 1)), "EINVAL", "no address space 2");
    assert_eq!(e(get(0, 32764)), "EINVAL", "not a user slot id");
    assert_eq!(e(get(1, 1)), "ENOENT", "valid address space, no slot");
    assert_eq!(e(get(0, 2)), "ENOENT", "a slot without logging");
    let clear =
        |a, id, first, count| vm.clear_dirty_log(AsId(a), SlotId(id), first, count, &[!0; 4]);
    assert_eq!(e(clear(2, 1, 1, 1)), "EINVAL", "ids before alignment");
    assert_eq!(e(clear(0, 9, 1, 1)), "EINVAL", "alignment before the slot lookup");
    assert_eq!(e(clear(0, 9, 0, 1)), "ENOENT", "the slot lookup before the range");
    assert_eq!(e(clear(0, 1, 256, 0)), "EINVAL", "first beyond the slot");
    assert_eq!(e(clear(0, 1, 0, 65)), "EINVAL", "count not a multiple of 64");
    assert_eq!(e(clear(0, 1, 128, 73)), "EINVAL", "past the end");
    assert_eq!(clear(0, 1, 128, 72), Ok(()), "a short count that ends at the slot's end");
    assert_eq!(
        e(vm.clear_dirty_log(AsId(0), SlotId(1), 0, 128, &[0])),
        "EFAULT",
        "bitmap shorter than the range"
    );
    // Without a bitmap (every page of the range): the same errnos in the same order, and a
    // huge refused range costs no bitmap.
    let all = |a, id, first, count| vm.clear_dirty_log_all(AsId(a), SlotId(id), first, count);
    assert_eq!(e(all(2, 1, 1, 1)), "EINVAL");
    assert_eq!(e(all(0, 9, 1, 1)), "EINVAL");
    assert_eq!(e(all(0, 9, 0, 1)), "ENOENT");
    assert_eq!(e(all(0, 1, 0, u32::MAX)), "EINVAL", "past the end, however far");
    assert_eq!(all(0, 1, 128, 72), Ok(()));
}

/// `clear_dirty_log_all` clears exactly what an all-ones bitmap clears.
#[test]
fn clearing_a_whole_range_is_an_all_ones_bitmap() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    vm.set_memory_region(&region(1, GPA, 200 << 12, RAM_HVA, LOG)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    for p in [0u64, 63, 64, 127, 128, 199] {
        v.access(GPA + (p << 12), true);
    }
    vm.clear_dirty_log_all(AsId(0), SlotId(1), 64, 64).unwrap();
    assert_eq!(get(&vm, 1), [0, 63, 128, 199]);
    vm.clear_dirty_log_all(AsId(0), SlotId(1), 128, 72).unwrap();
    assert_eq!(get(&vm, 1), [0, 63]);
    // The cleared pages were write-protected: a write faults and is logged again.
    assert_eq!(v.access(GPA + (64 << 12), true), 1);
    assert_eq!(get(&vm, 1), [0, 63, 64]);
}

#[test]
fn bitmap_follows_flag_changes_and_moves() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(1, GPA, 0x8000, RAM_HVA, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    v.access(GPA + 0x1000, true);
    assert_eq!(vm.get_dirty_log(AsId(0), SlotId(1)).unwrap_err().errno(), "ENOENT");
    // Logging starts: the writable translation cached before must not carry writes unlogged.
    vm.set_memory_region(&region(1, GPA, 0x8000, RAM_HVA, LOG)).unwrap();
    assert_eq!(get(&vm, 1), [] as [u64; 0], "writes before logging do not count");
    assert_eq!(v.access(GPA + 0x1000, true), 1, "the start of logging dropped the writable leaf");
    assert_eq!(vm.core().stats.pages_2m.get(), 0);
    // A move keeps the bitmap and its bits (KVM keeps `dirty_bitmap` across a move).
    v.access(GPA + 0x2000, true);
    vm.set_memory_region(&region(1, 0x80_0000, 0x8000, RAM_HVA, LOG)).unwrap();
    v.access(0x80_0000 + 0x3000, true);
    assert_eq!(get(&vm, 1), [1, 2, 3]);
    // Logging off and on again: a fresh, clear bitmap.
    v.access(0x80_0000 + 0x4000, true);
    vm.set_memory_region(&region(1, 0x80_0000, 0x8000, RAM_HVA, 0)).unwrap();
    assert_eq!(vm.get_dirty_log(AsId(0), SlotId(1)).unwrap_err().errno(), "ENOENT");
    vm.set_memory_region(&region(1, 0x80_0000, 0x8000, RAM_HVA, LOG)).unwrap();
    assert_eq!(get(&vm, 1), [] as [u64; 0]);
    vm.set_memory_region(&region(1, 0, 0, 0, 0)).unwrap();
    assert_eq!(vm.get_dirty_log(AsId(0), SlotId(1)).unwrap_err().errno(), "ENOENT");
}

/// KVM `kvm_mmu_slot_apply_flags` (with its default `eager_page_split`): starting dirty logging
/// splits huge leaves into 4 KiB leaves and write-protects what is mapped, and leaves it mapped:
/// reads hit (no fault, nothing dirty), writes fault once and are logged at 4 KiB, and a write
/// does not unmap its neighbours (a zapped huge leaf would make the next read of a page written
/// before fault and map it writable, which dirties it; real KVM on a shadow-paging host agrees).
#[test]
fn starting_logging_write_protects_and_keeps_mappings() {
    let (vm, h) = vm(FormatKind::Ept);
    h.set_zero_page_reads(false); // reads would map writable: they must not even fault
                                  // 2 MiB-aligned slot and host range: a write maps a 2 MiB leaf.
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    v.access(0x20_0000, true);
    assert_eq!(vm.stats().pages_2m, 1);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "split, still mapped");
    assert_eq!(v.access(0x20_5000, false), 0, "a read hits the write-protected leaf");
    assert_eq!(get(&vm, 1), [] as [u64; 0]);
    // The write faults (TLB flushed, leaf read-only) and makes its own leaf writable.
    assert_eq!(v.access(0x20_5000, true), 1);
    assert_eq!(get(&vm, 1), [5]);
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512));
    // The page written before logging, in the same 2 MiB block, is still mapped: no fault.
    assert_eq!(v.access(0x20_0000, false), 0, "the write left its neighbours mapped");
    assert_eq!(get(&vm, 1), [] as [u64; 0]);
}

/// Starting dirty logging splits a writable huge leaf and flushes the TLBs: a vCPU that cached a
/// writable translation of a page in the block faults on its next write, and the page is in the
/// GET. Kills `flush |= need == Remote` -> `&=` / `!=` after the split link in
/// `write_protect_table`, under which the write went through the stale TLB entry unlogged.
#[test]
fn a_write_through_a_cached_huge_translation_after_logging_starts_is_logged() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(0x20_5000, true), 1);
    assert_eq!(vm.stats().pages_2m, 1);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
    assert_eq!(v.access(0x20_5000, true), 1, "the cached writable translation was flushed");
    assert_eq!(get(&vm, 1), [5]);
}

/// Starting dirty logging write-protects exactly the slot's leaves, wherever in the tables the
/// slot begins: here two 8-page slots side by side in one leaf table, in the second 2 MiB of the
/// first GiB (so every level's range arithmetic counts). Every page of the logged slot is in the
/// GET after a write (none goes through a writable leaf left behind); the neighbour slot's
/// writable leaves stay writable (no fault). Kills `write_protect_table`'s `lo = base + i * span`
/// with `*` for `+` or `/` for `*`, under which the walk reached the wrong leaves.
#[test]
fn starting_logging_protects_exactly_the_slots_leaves_wherever_it_lies() {
    let (vm, _h) = vm(FormatKind::Ept);
    let (a, b) = (0x30_0000u64, 0x30_8000u64);
    vm.set_memory_region(&region(1, a, 0x8000, RAM_HVA, 0)).unwrap();
    vm.set_memory_region(&region(2, b, 0x8000, RAM_HVA + 0x8000, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    for p in 0..8 {
        v.access(a + p * 0x1000, true);
        v.access(b + p * 0x1000, true);
    }
    assert_eq!(vm.stats().pages_4k, 16);
    vm.set_memory_region(&region(1, a, 0x8000, RAM_HVA, LOG)).unwrap();
    for p in 0..8 {
        assert_eq!(v.access(b + p * 0x1000, true), 0, "slot 2 page {p} stays writable");
        assert_eq!(v.access(a + p * 0x1000, true), 1, "slot 1 page {p} was write-protected");
    }
    assert_eq!(get(&vm, 1), [0, 1, 2, 3, 4, 5, 6, 7]);
}

/// Guest-physical base of the 1 GiB slot the 1 GiB-leaf tests map, and its host address.
const SLOT: u64 = 1 << 30;
const BIG_HVA: u64 = 1 << 32;

/// An EPT VM whose host has `frames` table frames and maps [`BIG_HVA`] with one 1 GiB page, and
/// slot 1 over it at [`SLOT`] without logging, so a fault there maps a 1 GiB leaf.
fn vm_over_a_1g_host_page(frames: usize) -> (Vm<TestHost>, std::sync::Arc<TestHost>) {
    let host = TestHost::new(frames);
    host.map(BIG_HVA, 1 << 30, BIG_HVA >> 12, vmmu::Level::L1G, true);
    let host = std::sync::Arc::new(host);
    let vm = Vm::new(VmConfig::new(FormatKind::Ept, 46).unwrap(), host.clone()).unwrap();
    vm.set_memory_region(&region(1, SLOT, 1 << 30, BIG_HVA, 0)).unwrap();
    (vm, host)
}

/// Starting dirty logging splits a 1 GiB leaf all the way down to 4 KiB leaves (KVM's eager
/// split recurses), so after a write fault in one 2 MiB block the other pages of that block stay
/// mapped read-only: reading them neither faults nor dirties them, and the GET holds only the
/// written page. Kills `write_protect_table`'s `lower > Level::L4K` (the recursion into a split
/// 1 GiB leaf's 2 MiB children) as `<` or `==`: the 2 MiB children stayed huge and read-only
/// (the leaf counts; a write fault then splits its block, keeping the neighbours mapped).
#[test]
fn starting_logging_splits_a_1g_leaf_down_to_4k() {
    let (vm, _host) = vm_over_a_1g_host_page(1100);
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(SLOT + 0x20_5000, true), 1);
    assert_eq!(vm.stats().pages_1g, 1, "the host and the slot allow a 1 GiB leaf");
    vm.set_memory_region(&region(1, SLOT, 1 << 30, BIG_HVA, LOG)).unwrap();
    assert_eq!((vm.stats().pages_1g, vm.stats().pages_2m), (0, 0), "split to 4 KiB");
    assert_eq!(vm.stats().pages_4k, 512 * 512);
    assert_eq!(v.access(SLOT + 0x20_5000, true), 1, "written page write-protected");
    for off in [0x20_0000, 0x20_6000, 0x3f_f000, 0x3ff_f000] {
        assert_eq!(v.access(SLOT + off, false), 0, "{off:#x} stays mapped for reads");
    }
    assert_eq!(get(&vm, 1), [0x205]);
}

/// Starting dirty logging on a writable 1 GiB leaf when only its own split can have a table page
/// (its 2 MiB children stay huge and read-only: KVM's eager split is best effort) still flushes
/// the TLBs, once: a vCPU that cached the writable 1 GiB translation is told to flush it, so its
/// next write faults instead of going through unlogged. Each 2 MiB child maps its own part of
/// the 1 GiB block. Kills `write_protect_table`'s `flush |=` of the recursion into the split
/// 1 GiB leaf's children -> `&=` (the recursion, which split nothing, cleared the flush the
/// split itself needed), and `split_huge_leaf`'s child frame `first + i * pages` -> `i / pages`
/// (every 2 MiB child mapped the block's first 2 MiB).
#[test]
fn starting_logging_flushes_after_a_1g_split_whose_children_cannot_split() {
    // Three table frames: the root, the PDPT, and the table the 1 GiB leaf splits into.
    let (vm, host) = vm_over_a_1g_host_page(3);
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(SLOT + 0x20_5000, true), 1);
    assert_eq!((vm.stats().pages_1g, host.tables_in_use()), (1, 2));
    let flushes = vm.stats().remote_tlb_flush_requests;
    vm.set_memory_region(&region(1, SLOT, 1 << 30, BIG_HVA, LOG)).unwrap();
    assert_eq!((vm.stats().pages_1g, vm.stats().pages_2m), (0, 512), "split to 2 MiB only");
    assert_eq!(vm.stats().remote_tlb_flush_requests, flushes + 1);
    assert!(v.vcpu.service_requests().unwrap().flush_tlb, "the 1 GiB translation is flushed");
    let mut r = TlbVcpu::new(&vm);
    for off in [0x20_5000u64, 0x3ff_f000] {
        assert_eq!(r.access(SLOT + off, false), 0, "{off:#x}: mapped read-only, no fault");
        let want = Pfn((BIG_HVA + off) >> 12);
        assert_eq!(r.tlb[&((SLOT + off) >> 12)], (want, false), "{off:#x}");
    }
}

/// A VMM in manual mode clears exactly the bits its GET returned: the CLEAR takes them (the
/// next GET is empty) and write-protects those pages, so the guest's next writes fault and are
/// in the next GET; a dirty page of the same word left out of the CLEAR stays dirty and
/// writable. Kills `DirtyBitmap::clear`'s cheap test `word & mask == 0` -> `word ^ mask == 0`,
/// under which a CLEAR whose bits were exactly the word's cleared nothing: every page a GET
/// returned stayed dirty for good (a migration that never converges).
#[test]
fn clearing_exactly_what_get_returned_takes_it_and_reprotects() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    vm.set_memory_region(&region(1, GPA, 0x10000, RAM_HVA, LOG)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    v.access(GPA, true);
    v.access(GPA + 0x5000, true);
    let words = vm.get_dirty_log(AsId(0), SlotId(1)).unwrap();
    assert_eq!(pages_of(&words).collect::<Vec<_>>(), [0, 5]);
    vm.clear_dirty_log(AsId(0), SlotId(1), 0, 16, &words).unwrap();
    assert_eq!(get(&vm, 1), [] as [u64; 0], "the CLEAR took what the GET returned");
    assert_eq!(v.access(GPA + 0x5000, true), 1, "page 5 was write-protected");
    assert_eq!(get(&vm, 1), [5]);
    // Page 0 again: leave it out of the CLEAR of page 5.
    assert_eq!(v.access(GPA, true), 1);
    vm.clear_dirty_log(AsId(0), SlotId(1), 0, 16, &[1 << 5]).unwrap();
    assert_eq!(get(&vm, 1), [0]);
    assert_eq!(v.access(GPA + 0x8, true), 0, "page 0 was not cleared: still writable");
    assert_eq!(v.access(GPA + 0x5000, true), 1);
    assert_eq!(get(&vm, 1), [0, 5]);
}

/// A `KVM_CLEAR_DIRTY_LOG` that clears no dirty bit (the pages asked for are clean) changes no
/// leaf and flushes no TLB (KVM flushes only when `mask` took a bit): the vCPUs stay in guest
/// mode and keep their translations. Kills `clear_log`'s `flush && !skip_flush()` -> `||`,
/// under which every such CLEAR kicked every vCPU out to flush its TLB.
#[test]
fn a_clear_that_takes_no_dirty_bit_flushes_no_tlb() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    vm.set_memory_region(&region(1, GPA, 200 << 12, RAM_HVA, LOG)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    v.access(GPA + 0x3000, true);
    assert!(!v.vcpu.service_requests().unwrap().flush_tlb);
    let flushes = vm.stats().remote_tlb_flush_requests;
    // A clean page of the dirty page's word, and whole clean words.
    vm.clear_dirty_log(AsId(0), SlotId(1), 0, 64, &[1 << 4]).unwrap();
    vm.clear_dirty_log_all(AsId(0), SlotId(1), 64, 136).unwrap();
    assert_eq!(vm.stats().remote_tlb_flush_requests, flushes, "nothing cleared, nothing flushed");
    assert!(!v.vcpu.service_requests().unwrap().flush_tlb, "the vCPU was asked to flush");
    assert_eq!(v.access(GPA + 0x3000, true), 0, "page 3 stays writable");
    assert_eq!(get(&vm, 1), [3]);
}

/// A slot of 1040 pages at gfn 496 (so its 64-page bitmap words start 16 pages before each
/// 2 MiB boundary: word 0 and word 8 each span two 2 MiB blocks) over 2 MiB host pages with a
/// congruent host address, so blocks `[512, 1024)` and `[1024, 1536)` may be 2 MiB leaves.
const IS_GPA: u64 = 0x1f_0000;
const IS_SIZE: u64 = 0x41_0000;
const IS_HVA: u64 = RAM_HVA + IS_GPA;

/// The page index in the [`IS_GPA`] slot of guest-physical page `gfn`.
fn is_page(gfn: u64) -> u64 {
    gfn - (IS_GPA >> 12)
}

/// "Initially set" (`KVM_DIRTY_LOG_INITIALLY_SET`): a slot that starts logging reports every
/// page at once and keeps its mappings (huge leaves stay, writes go through without faulting:
/// no write protection, no flush); a CLEAR write-protects what it clears, splitting the huge
/// leaves its word meets, both of them when the word spans two 2 MiB blocks (KVM protects the
/// huge pages of the first and of the last page of the mask), and flushes: a vCPU that cached
/// a writable huge translation faults on its next write there, and both writes are in the next
/// GET. Reads elsewhere in the split blocks keep hitting.
#[test]
fn initially_set_reports_every_page_and_clears_protect_huge_leaves_they_meet() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::InitiallySet);
    vm.set_memory_region(&region(1, IS_GPA, IS_SIZE, IS_HVA, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(0x20_5000, true), 1);
    assert_eq!(v.access(0x40_6000, true), 1);
    assert_eq!(vm.stats().pages_2m, 2, "two 2 MiB leaves");
    let flushes = vm.stats().remote_tlb_flush_requests;
    vm.set_memory_region(&region(1, IS_GPA, IS_SIZE, IS_HVA, LOG)).unwrap();
    assert_eq!(vm.stats().pages_2m, 2, "logging started without splitting");
    assert_eq!(vm.stats().remote_tlb_flush_requests, flushes, "nor flushing");
    assert_eq!(v.access(0x20_5008, true), 0, "the cached writable translation stays");
    let mut fresh = TlbVcpu::new(&vm);
    assert_eq!(fresh.access(0x2f_f000, true), 0, "the huge leaf stays writable");
    assert_eq!(get(&vm, 1), (0..IS_SIZE >> 12).collect::<Vec<_>>(), "every page is dirty");
    // Word 8 is pages 512..576 of the slot, gfns 1008..1072: it spans blocks 1 and 2. Clear
    // one page in each block.
    let (a, b) = (0x3fc, 0x406);
    let word = (1 << (is_page(a) - 512)) | (1 << (is_page(b) - 512));
    vm.clear_dirty_log(AsId(0), SlotId(1), 512, 64, &[word]).unwrap();
    assert_eq!(vm.stats().pages_2m, 0, "both blocks split");
    let dirty = get(&vm, 1);
    assert!(!dirty.contains(&is_page(a)) && !dirty.contains(&is_page(b)), "cleared");
    assert_eq!(dirty.len() as u64, (IS_SIZE >> 12) - 2);
    assert_eq!(v.access(0x40_6000, true), 1, "the cached huge translation was flushed");
    assert_eq!(fresh.access(a << 12, true), 1, "page {a:#x} was write-protected");
    for off in [0x20_0000u64, 0x3f_f000, 0x40_0000, 0x5f_f000] {
        assert_eq!(fresh.access(off, false), 0, "{off:#x} stays mapped for reads");
    }
    assert_eq!(get(&vm, 1), (0..IS_SIZE >> 12).collect::<Vec<_>>(), "both writes logged");
}

/// "Initially set" sets the bits of a slot that starts logging (created with logging, or
/// turned on by a flags change), not of one that keeps logging across a move (its bitmap and
/// bits go with it); a slot made before the mode changed keeps what it had.
#[test]
fn initially_set_applies_when_logging_starts() {
    let (vm, _h) = vm(FormatKind::Npt);
    vm.set_memory_region(&region(2, 0x100_0000, 0x4000, RAM_HVA, LOG)).unwrap();
    vm.set_dirty_log_mode(DirtyLogMode::InitiallySet);
    assert_eq!(get(&vm, 2), [] as [u64; 0], "logging before the mode: a clear bitmap");
    vm.set_memory_region(&region(1, GPA, 0x3000, RAM_HVA, LOG)).unwrap();
    assert_eq!(get(&vm, 1), [0, 1, 2], "created logging");
    vm.clear_dirty_log_all(AsId(0), SlotId(1), 0, 3).unwrap();
    vm.set_memory_region(&region(1, 0x80_0000, 0x3000, RAM_HVA, LOG)).unwrap();
    assert_eq!(get(&vm, 1), [] as [u64; 0], "a move keeps the (cleared) bitmap");
    vm.set_memory_region(&region(1, 0x80_0000, 0x3000, RAM_HVA, 0)).unwrap();
    vm.set_memory_region(&region(1, 0x80_0000, 0x3000, RAM_HVA, LOG)).unwrap();
    assert_eq!(get(&vm, 1), [0, 1, 2], "logging turned on again");
    vm.set_dirty_log_mode(DirtyLogMode::Manual);
    vm.set_memory_region(&region(3, 0x90_0000, 0x3000, RAM_HVA, LOG)).unwrap();
    assert_eq!(get(&vm, 3), [] as [u64; 0], "plain manual mode: clear");
    assert_eq!(get(&vm, 1), [0, 1, 2], "the GET only read");
}

/// "Initially set" over a 1 GiB leaf: logging starts without touching it; a CLEAR of one word
/// splits it into 2 MiB leaves and the one its word meets into 4 KiB leaves (the rest stay 2 MiB,
/// read-only), so a write in the word faults and is logged while reads elsewhere in the GiB
/// keep hitting. Kills `write_protect_table`'s `lower > Level::L4K` as `==` / `<` (the
/// 2 MiB child of the word left huge).
#[test]
fn initially_set_clear_splits_a_1g_leaf_down_to_the_words_4k() {
    let (vm, _host) = vm_over_a_1g_host_page(1100);
    vm.set_dirty_log_mode(DirtyLogMode::InitiallySet);
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(SLOT + 0x20_5000, true), 1);
    vm.set_memory_region(&region(1, SLOT, 1 << 30, BIG_HVA, LOG)).unwrap();
    assert_eq!(vm.stats().pages_1g, 1, "logging started without splitting");
    // Word 0x205 / 64 = 8 of the slot: pages 0x200..0x240.
    vm.clear_dirty_log(AsId(0), SlotId(1), 0x200, 64, &[1 << 5]).unwrap();
    let s = vm.stats();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (0, 511, 512), "split down to the word");
    assert_eq!(v.access(SLOT + 0x20_5000, true), 1, "the cleared page faults");
    for off in [0x20_6000u64, 0x40_0000, 0x3ff_f000] {
        assert_eq!(v.access(SLOT + off, false), 0, "{off:#x} stays mapped for reads");
    }
    let dirty = get(&vm, 1);
    assert_eq!(dirty.len() as u64, (1 << 18), "every page (the cleared one written again)");
}

/// A write fault under a read-only 2 MiB leaf of a logged slot (here one that logging started
/// on when no table page could be had, so it was write-protected whole) splits that leaf into
/// read-only 4 KiB leaves and makes only the written one writable (KVM `kvm_tdp_mmu_map`: a huge
/// SPTE above the goal level is split, `tdp_mmu_split_huge_page`, children with the parent's
/// rights). The block's other pages stay mapped read-only: a read of one of them neither faults
/// nor makes it dirty. (This MMU used to zap the leaf: the read faulted, mapped the page
/// writable, since its host page is, and the next GET reported a page the guest never wrote.)
#[test]
fn a_write_under_a_read_only_2m_leaf_in_a_logged_slot_keeps_its_neighbours_mapped() {
    let (vm, h) = vm(FormatKind::Ept);
    h.set_zero_page_reads(false); // a read that faulted would map the page writable
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(0x20_0000, true), 1);
    h.set_fail_alloc(true);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
    h.set_fail_alloc(false);
    assert_eq!(vm.stats().pages_2m, 1, "no table page for the split: protected whole");
    assert!(v.access(0x20_5000, true) >= 1, "the 2 MiB leaf is read-only");
    assert_eq!(get(&vm, 1), [5]);
    assert_eq!(v.access(0x20_1000, false), 0, "a neighbour stays mapped for reads");
    assert_eq!(get(&vm, 1), [] as [u64; 0], "and is not dirty");
    let s = vm.stats();
    assert_eq!((s.pages_2m, s.pages_4k), (0, 512), "the 2 MiB leaf was split, not zapped");
    assert_eq!(v.access(0x20_1000, true), 1, "a write to it faults, once");
    assert_eq!(get(&vm, 1), [1]);
}

/// The same through a read-only 1 GiB leaf: one write fault splits it into read-only 2 MiB
/// leaves and the one it falls in into read-only 4 KiB leaves, on its way down, and only the
/// written page becomes writable; reads anywhere else in the GiB neither fault nor dirty.
#[test]
fn a_write_under_a_read_only_1g_leaf_splits_it_on_the_way_down() {
    let (vm, h) = vm_over_a_1g_host_page(1100);
    h.set_zero_page_reads(false);
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(SLOT, true), 1);
    h.set_fail_alloc(true);
    vm.set_memory_region(&region(1, SLOT, 1 << 30, BIG_HVA, LOG)).unwrap();
    h.set_fail_alloc(false);
    assert_eq!(vm.stats().pages_1g, 1, "no table page for the split: protected whole");
    assert!(v.access(SLOT + 0x20_5000, true) >= 1, "the 1 GiB leaf is read-only");
    for off in [0x20_6000u64, 0x40_0000, 0x3ff_f000, 0] {
        assert_eq!(v.access(SLOT + off, false), 0, "{off:#x} stays mapped for reads");
    }
    assert_eq!(get(&vm, 1), [0x205]);
    let s = vm.stats();
    assert_eq!((s.pages_1g, s.pages_2m, s.pages_4k), (0, 511, 512), "split on the way down");
}

/// An "initially set" CLEAR of some pages of a writable 2 MiB leaf splits it and write-protects
/// those pages only: the other children keep the parent's rights (KVM
/// `kvm_arch_mmu_enable_log_dirty_pt_masked` splits with `make_huge_page_split_spte`, then
/// protects the mask), so a write to a page whose bit is still set takes no fault, and when
/// logging stops the 2 MiB leaf put back from the first child is writable again, as in KVM.
#[test]
fn an_initially_set_clear_protects_only_its_pages_of_a_split_leaf() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_dirty_log_mode(DirtyLogMode::InitiallySet);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(0x20_0000, true), 1);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
    vm.clear_dirty_log(AsId(0), SlotId(1), 0, 64, &[1 << 5]).unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "split");
    assert_eq!(v.access(0x20_6000, true), 0, "page 6's bit is set: its leaf stayed writable");
    assert_eq!(v.access(0x20_5000, true), 1, "page 5 was cleared and protected");
    assert_eq!(get(&vm, 1).len(), 512, "every bit set again");
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    assert_eq!(vm.stats().pages_2m, 1, "logging stopped: the 2 MiB leaf is back");
    assert_eq!(v.access(0x20_7000, true), 0, "writable, from the first child");
}

/// The same CLEAR when only the 1 GiB leaf's own split can have a table page (its 2 MiB
/// children stay huge and read-only) still flushes: a vCPU that cached the writable 1 GiB
/// translation is told to drop it, and the page's translation is read-only now. Kills the recursion's `flush |=` ->
/// `&=` in `write_protect_table` (the recursion, which split nothing, cleared the flush
/// the split itself needed).
#[test]
fn initially_set_clear_flushes_after_a_1g_split_whose_children_cannot_split() {
    let (vm, host) = vm_over_a_1g_host_page(3);
    vm.set_dirty_log_mode(DirtyLogMode::InitiallySet);
    let mut v = TlbVcpu::new(&vm);
    assert_eq!(v.access(SLOT + 0x20_5000, true), 1);
    assert_eq!((vm.stats().pages_1g, host.tables_in_use()), (1, 2));
    vm.set_memory_region(&region(1, SLOT, 1 << 30, BIG_HVA, LOG)).unwrap();
    assert_eq!(v.access(SLOT + 0x20_5008, true), 0, "writable, cached, not flushed");
    vm.clear_dirty_log(AsId(0), SlotId(1), 0x200, 64, &[1 << 5]).unwrap();
    assert_eq!((vm.stats().pages_1g, vm.stats().pages_2m), (0, 512), "split to 2 MiB only");
    assert!(v.vcpu.service_requests().unwrap().flush_tlb, "the 1 GiB translation is flushed");
    assert!(!get(&vm, 1).contains(&0x205), "cleared");
    let mut r = TlbVcpu::new(&vm);
    assert_eq!(r.access(SLOT + 0x20_5000, false), 0, "mapped, no fault");
    assert!(!r.tlb[&((SLOT + 0x20_5000) >> 12)].1, "read-only: the next write faults");
}

/// `Vcpu::mark_page_dirty` (KVM `kvm_vcpu_mark_page_dirty`): a page the hypervisor wrote for the
/// guest is in the next GET of its slot's log; outside any slot, or in a slot that does not
/// log, nothing is marked.
#[test]
fn a_page_the_hypervisor_wrote_for_the_guest_is_logged() {
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, 0x10_0000, 0x10_0000, RAM_HVA, KVM_MEM_LOG_DIRTY_PAGES))
        .unwrap();
    vm.set_memory_region(&region(1, 0x40_0000, 0x1000, RAM_HVA + 0x10_0000, 0)).unwrap();
    let v = vm.create_vcpu().unwrap();
    v.mark_page_dirty(Gpa(0x10_5123));
    v.mark_page_dirty(Gpa(0x40_0000));
    v.mark_page_dirty(Gpa(0x90_0000));
    let dirty: Vec<u64> = pages_of(&vm.get_dirty_log(AsId(0), SlotId(0)).unwrap()).collect();
    assert_eq!(dirty, vec![5]);
}

/// Runs `access` on `v` on another thread, parked once at `point` (a preemption point,
/// `vmmu::testing::preempt`); returns when it is parked, with the sender that lets it go on and
/// the handle that gives the vCPU back with what the access returned.
#[allow(clippy::type_complexity)]
fn park_access_at(
    mut v: TlbVcpu,
    point: vmmu::host::PreemptPoint,
    gpa: u64,
    write: bool,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<(TlbVcpu, usize)>) {
    let (reached_tx, reached_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        common::park_once_at(point, reached_tx, go_rx);
        let faults = v.access(gpa, write);
        vmmu::testing::preempt::on_this_thread(None);
        (v, faults)
    });
    reached_rx.recv().unwrap();
    (go_tx, t)
}

/// Concurrency audit (KVM `kvm_mmu_slot_apply_flags` runs after `kvm_swap_active_memslots`,
/// whose grace period waits for every fault that read the old memslots): a write fault that
/// decided from the set of before dirty logging starts (the slot not logged: a writable 2 MiB
/// leaf, no mark) and installs after the start has published its set
/// (`PreemptPoint::FaultDecided`) lands before the start write-protects, so once the start has
/// returned the next write to any page of the block faults and is logged. A start that
/// protected before its grace period (or no later than its publication) would leave that
/// writable huge leaf behind, and the write would go unlogged.
#[test]
fn a_write_fault_decided_before_logging_starts_and_installed_after_its_publication_is_protected() {
    use vmmu::host::PreemptPoint;
    let (vm, _h) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let v = TlbVcpu::new(&vm);
    let (go, t) = park_access_at(v, PreemptPoint::FaultDecided, 0x20_5000, true);
    // The start publishes its set (logging on), then waits for the parked fault's read section.
    let start = common::update_published(&vm, region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG));
    go.send(()).unwrap();
    let (mut v, faults) = t.join().unwrap();
    assert_eq!(faults, 1, "the parked write faulted once");
    assert_eq!(v.tlb[&0x205], (Pfn((RAM_HVA >> 12) + 5), true), "it installed a writable leaf");
    assert_eq!(v.vcpu.stats.pf_fixed, 1, "from the old set: the fault's decision was installed");
    start.join().unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "split by the start");
    assert_eq!(get(&vm, 1), [] as [u64; 0], "the old set's fault marked nothing");
    assert_eq!(v.access(0x20_5008, true), 1, "the cached writable translation was flushed");
    assert_eq!(v.access(0x20_7000, true), 1, "its neighbour is write-protected too");
    assert_eq!(get(&vm, 1), [5, 7]);
}

/// The same, where the fault's huge leaf replaces a table in its way (KVM `kvm_tdp_mmu_map`
/// over a lower table; here under the exclusive lock after the shared one was let go,
/// `PreemptPoint::TableInTheWay`): the start of dirty logging publishes its set in that
/// window and waits for the fault; the fault re-checks and installs the writable 2 MiB leaf it
/// decided from the old set, and the start then splits and protects it.
#[test]
fn a_huge_leaf_that_replaces_a_table_while_logging_starts_is_protected_by_the_start() {
    use vmmu::host::PreemptPoint;
    let (vm, _h) = vm(FormatKind::Ept);
    let mut v = TlbVcpu::new(&vm);
    // No slot yet: the read leaves a 4 KiB table holding its MMIO SPTE in the block.
    let (seen, _) = common::access(&mut v.vcpu, 0x20_3000, false).unwrap();
    assert!(matches!(seen, common::Seen::Mmio(_)));
    vm.set_memory_region(&region(1, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
    let (go, t) = park_access_at(v, PreemptPoint::TableInTheWay, 0x20_5000, true);
    let start = common::update_published(&vm, region(1, 0x20_0000, 0x20_0000, RAM_HVA, LOG));
    go.send(()).unwrap();
    let (mut v, faults) = t.join().unwrap();
    assert_eq!(faults, 1, "the parked write faulted once");
    assert_eq!(v.tlb[&0x205], (Pfn((RAM_HVA >> 12) + 5), true), "it installed a writable leaf");
    start.join().unwrap();
    assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (0, 512), "split by the start");
    assert_eq!(vm.stats().tdp_tables_zapped, 1, "the table in the way went");
    assert_eq!(get(&vm, 1), [] as [u64; 0]);
    assert_eq!(v.access(0x20_5008, true), 1, "the cached writable translation was flushed");
    assert_eq!(v.access(0x20_3000, true), 1, "the page of the old table is protected too");
    assert_eq!(get(&vm, 1), [3, 5]);
}
