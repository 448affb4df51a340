//! Behaviour of the TDP MMU's zaps (`tdp/zap.rs`) that mutation testing found no test pinning:
//! each test here fails with the mutant its doc names applied, and shows what a vCPU would use
//! (a translation, an SPTE left in a root) or a KVM counter, not an internal flag.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod common;

use common::{access, park_once_at, region, spte_4k, vm, Seen, RAM_HVA};
use vmmu::spte::FormatKind;
use vmmu::testing::TestHost;
use vmmu::vcpu::Vcpu;
use vmmu::vm::Vm;
use vmmu::Pfn;

/// `zap_all_fast` zaps the whole of every obsolete root, up to the top of the guest-physical
/// space it maps (2^36 gfns under a 4-level root), not only its low gigabytes: a leaf at 4 GiB
/// is gone from the root before its vCPU handled the reload request (in KVM a vCPU may still
/// run on the obsolete root until its next entry). Kills, in `zap_root_locked`'s end gfn
/// `1 << (shift + 9 - PAGE_SHIFT)`, `+` -> `-` (the zap stopped at 1 GiB) and `+` -> `*` (at 2
/// GiB in release, where the shift wraps).
#[test]
fn zap_all_fast_zaps_an_obsolete_root_above_the_first_gigabytes() {
    const HIGH: u64 = 0x1_0010_0000; // 4 GiB + 1 MiB
    let (vm, _host) = vm(FormatKind::Ept);
    vm.set_memory_region(&region(0, HIGH, 0x1000, RAM_HVA, 0)).unwrap();
    let mut v = vm.create_vcpu().unwrap();
    assert_eq!(access(&mut v, HIGH, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
    let root = v.root().unwrap().clone();
    assert!(spte_4k(&vm, &root, HIGH).is_some(), "setup: the leaf is in the root");
    vm.zap_all_fast();
    assert_eq!(spte_4k(&vm, &root, HIGH), None, "the obsolete root kept its leaf at 4 GiB");
    assert!(v.service_requests().unwrap().flush_tlb, "the vCPU reloads and flushes");
    assert_eq!(access(&mut v, HIGH, false).unwrap().0, Seen::Ram(Pfn(RAM_HVA >> 12)));
}

/// Stopping dirty logging on a slot (KVM `kvm_mmu_recover_huge_pages`) replaces a split 2 MiB
/// block's table by one huge leaf whose frame is the block's first frame, taken from the first
/// present 4 KiB leaf under the table even when that leaf is not the block's first page; the
/// vCPUs flush their TLBs (the table they may have cached goes). A slot with nothing to recover
/// flushes nothing. Kills, in `recover_huge_pages`, `flush |=` -> `&=`, `flush && !bug` -> `||`
/// and deleting its `!`; in `recover_in_table`, replacing it with `true` or `false`, the
/// recursion's `flush |=` -> `&=`, and the frame's `& !(span - 1)` -> `& !(span + 1)` or
/// `& !(span / 1)` (the leaf mapped the block from the wrong frame).
#[test]
fn recovering_a_huge_page_takes_the_blocks_frame_and_flushes_only_when_a_table_went() {
    use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES as LOG;
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h) = vm(f);
        // Block frames from RAM_HVA + 2 MiB: bit 9 of the frame number is set.
        let hva0 = RAM_HVA + 0x20_0000;
        let frame0 = hva0 >> 12;
        let slot0 = |flags| region(0, 0x20_0000, 0x20_0000, hva0, flags);
        let slot1 = |flags| region(1, 0x40_0000, 0x20_0000, RAM_HVA + 0x40_0000, flags);
        vm.set_memory_region(&slot0(LOG)).unwrap();
        vm.set_memory_region(&slot1(LOG)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        // Logging: one 4 KiB leaf, for page 5 of the block only.
        assert_eq!(access(&mut v, 0x20_5000, true).unwrap().0, Seen::Ram(Pfn(frame0 + 5)));
        assert_eq!((vm.stats().pages_4k, vm.stats().pages_2m), (1, 0), "{f:?}: setup");
        v.service_requests().unwrap();
        let before = vm.stats().remote_tlb_flush_requests;
        // Slot 1 has nothing mapped: nothing to recover, nothing to flush.
        vm.set_memory_region(&slot1(0)).unwrap();
        assert_eq!(vm.stats().remote_tlb_flush_requests, before, "{f:?}: a flush for nothing");
        assert!(!v.service_requests().unwrap().flush_tlb, "{f:?}: a flush for nothing");
        // Slot 0's table becomes one 2 MiB leaf.
        vm.set_memory_region(&slot0(0)).unwrap();
        assert_eq!((vm.stats().pages_4k, vm.stats().pages_2m), (0, 1), "{f:?}: recovered");
        assert_eq!(vm.stats().remote_tlb_flush_requests, before + 1, "{f:?}: no flush");
        assert!(v.service_requests().unwrap().flush_tlb, "{f:?}: the vCPU kept its TLB");
        for page in [0u64, 5, 0x1ff] {
            let (seen, faults) = access(&mut v, 0x20_0000 + (page << 12), false).unwrap();
            assert_eq!(seen, Seen::Ram(Pfn(frame0 + page)), "{f:?}: page {page:#x}");
            assert!(faults.is_empty(), "{f:?}: page {page:#x} faulted: {faults:?}");
        }
    }
}

/// A VM in `format` with two vCPUs, v and w, where v's read of `0x20_3000` (no slot yet) left a
/// 4 KiB table holding its MMIO SPTE in the 2 MiB block at `0x20_0000`.
fn two_vcpus_over_a_table_of_mmio_sptes(
    format: FormatKind,
) -> (Vm<TestHost>, std::sync::Arc<TestHost>, Vcpu<TestHost>, Vcpu<TestHost>) {
    let (vm, host) = vm(format);
    let mut v = vm.create_vcpu().unwrap();
    let w = vm.create_vcpu().unwrap();
    assert!(matches!(access(&mut v, 0x20_3000, false).unwrap().0, Seen::Mmio(_)), "{format:?}");
    (vm, host, v, w)
}

/// A fault that maps a 2 MiB leaf where a 4 KiB table of old MMIO SPTEs is still linked (KVM
/// `kvm_tdp_mmu_map` at the target level, then `handle_removed_pt`) unlinks that table and
/// flushes every vCPU's TLB before the table can be freed: another vCPU may hold the link in its
/// paging-structure caches, with nothing below it present. Kills, in
/// `replace_table_in_the_way`, `set_spte_locked(..) == FlushNeed::Remote` -> `!=`, the detached
/// table's `flush |=` -> `&=`, and deleting the `!` of `flush && !bug`: each left the other
/// vCPU with no flush request (KVM's `remote_tlb_flush_requests` stat did not move).
#[test]
fn a_huge_leaf_over_a_table_of_mmio_sptes_flushes_the_other_vcpus() {
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h, mut v, mut w) = two_vcpus_over_a_table_of_mmio_sptes(f);
        // w walks the 4 KiB table of the block too, through v's MMIO SPTE.
        assert!(matches!(access(&mut w, 0x20_3000, false).unwrap().0, Seen::Mmio(_)), "{f:?}");
        vm.set_memory_region(&region(0, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
        w.service_requests().unwrap();
        let before = vm.stats().remote_tlb_flush_requests;
        let (seen, faults) = access(&mut v, 0x20_5000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 5)), "{f:?}");
        assert_eq!(faults.len(), 1, "{f:?}: {faults:?}");
        assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "{f:?}: setup");
        assert_eq!(vm.stats().remote_tlb_flush_requests, before + 1, "{f:?}: no flush");
        assert!(w.service_requests().unwrap().flush_tlb, "{f:?}: w kept the unlinked table");
        let (seen, faults) = access(&mut w, 0x20_3000, false).unwrap();
        assert_eq!((seen, faults), (Seen::Ram(Pfn((RAM_HVA >> 12) + 3)), vec![]), "{f:?}");
    }
}

/// Two vCPUs fault in one 2 MiB block that still holds a 4 KiB table of old MMIO SPTEs: the
/// first finds the table in the way and lets go of the shared lock; before it holds the lock
/// exclusive, the second replaces the table with the huge leaf. The first then finds a leaf
/// where it expected the table and retries (its next walk hits the leaf), and the leaf stays.
/// Kills, in `replace_table_in_the_way`, `!present || is_leaf` -> `&&`, under which the first
/// vCPU took the huge leaf for a table: it "zapped" the guest's 2 MiB block as a table page and
/// gave that RAM to the host to free as one (counted as a second zapped table).
#[test]
fn a_table_replaced_meanwhile_by_another_vcpu_is_left_to_its_huge_leaf() {
    use std::sync::mpsc;
    use vmmu::host::PreemptPoint;
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, host, mut v, mut w) = two_vcpus_over_a_table_of_mmio_sptes(f);
        vm.set_memory_region(&region(0, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
        let (zapped, in_use) = (vm.stats().tdp_tables_zapped, host.tables_in_use());
        let (reached_tx, reached_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let first = std::thread::spawn(move || {
            park_once_at(PreemptPoint::TableInTheWay, reached_tx, go_rx);
            let r = access(&mut v, 0x20_3000, false).map(|(seen, _)| seen);
            vmmu::testing::preempt::on_this_thread(None);
            r
        });
        reached_rx.recv().unwrap();
        let (seen, _) = access(&mut w, 0x20_5000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 5)), "{f:?}");
        assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "{f:?}: w's huge leaf");
        go_tx.send(()).unwrap();
        let seen = first.join().unwrap().unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 3)), "{f:?}");
        assert_eq!((vm.stats().pages_2m, vm.stats().pages_4k), (1, 0), "{f:?}: the leaf stays");
        // Only the one table w unlinked was zapped, and it goes back to the host after its grace
        // period.
        assert_eq!(vm.stats().tdp_tables_zapped, zapped + 1, "{f:?}: one table zapped");
        vm.reclaim();
        assert_eq!(host.tables_in_use(), in_use - 1, "{f:?}: one table freed");
        let (seen, faults) = access(&mut w, 0x20_3000, false).unwrap();
        assert_eq!((seen, faults), (Seen::Ram(Pfn((RAM_HVA >> 12) + 3)), vec![]), "{f:?}");
    }
}

/// A host invalidation zaps leaves and keeps the tables linked (KVM `kvm_unmap_gfn_range`, the
/// `tdp_mmu_zap_leafs` of the MMU notifier): the fault after it maps again in the same tables,
/// allocating none. A memslot delete unlinks the tables inside its range (`tdp_tables_zapped`
/// counts them; KVM's `mmu_shadow_zapped` counts only shadow pages and stays 0). Kills
/// `e.inside(..) && scope == ZapScope::Tables`
/// -> `scope != ZapScope::Tables` in `zap_table` (the host invalidation unlinked the 4 KiB
/// table and the delete did not).
#[test]
fn a_host_invalidation_keeps_tables_and_a_delete_unlinks_them() {
    use vmmu::memslot::KVM_MEM_LOG_DIRTY_PAGES as LOG;
    use vmmu::Hva;
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h) = vm(f);
        // A dirty-logged 2 MiB slot: 4 KiB leaves in one 4 KiB table.
        vm.set_memory_region(&region(0, 0x20_0000, 0x20_0000, RAM_HVA, LOG)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        for page in [3u64, 0x100] {
            let want = Seen::Ram(Pfn((RAM_HVA >> 12) + page));
            assert_eq!(access(&mut v, 0x20_0000 + (page << 12), false).unwrap().0, want);
        }
        let s = vm.stats();
        assert_eq!((s.pages_4k, s.tdp_tables_zapped), (2, 0), "{f:?}: setup");
        let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x20_0000));
        inv.end();
        let s = vm.stats();
        assert_eq!((s.pages_4k, s.tdp_tables_zapped), (0, 0), "{f:?}: a table went");
        let (seen, faults) = access(&mut v, 0x20_3000, false).unwrap();
        assert_eq!(seen, Seen::Ram(Pfn((RAM_HVA >> 12) + 3)), "{f:?}");
        assert_eq!(faults.len(), 1, "{f:?}: {faults:?}");
        assert_eq!(vm.stats().tables_allocated, s.tables_allocated, "{f:?}: a new table");
        vm.set_memory_region(&region(0, 0x20_0000, 0, 0, 0)).unwrap();
        let s = vm.stats();
        assert_eq!((s.pages_4k, s.tdp_tables_zapped), (0, 1), "{f:?}: the table stayed");
        assert_eq!(s.mmu_shadow_zapped, 0, "{f:?}: KVM's TDP MMU counts no shadow page");
    }
}

/// Deleting a one-page slot zaps that page only: a neighbouring slot's leaf in the same 4 KiB
/// table (and every table above, which the delete's range only partly covers) stays, and the
/// guest reads the neighbour without a fault. Kills `e.inside(..) && scope == ZapScope::Tables`
/// -> `||` in `zap_table`, under which every table the range met was unlinked whole.
#[test]
fn deleting_a_page_keeps_its_neighbours_leaf_in_the_same_table() {
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h) = vm(f);
        vm.set_memory_region(&region(0, 0x20_0000, 0x1000, RAM_HVA, 0)).unwrap();
        vm.set_memory_region(&region(1, 0x20_1000, 0x1000, RAM_HVA + 0x1000, 0)).unwrap();
        let mut v = vm.create_vcpu().unwrap();
        for page in [0u64, 1] {
            let want = Seen::Ram(Pfn((RAM_HVA >> 12) + page));
            assert_eq!(access(&mut v, 0x20_0000 + (page << 12), false).unwrap().0, want);
        }
        vm.set_memory_region(&region(0, 0x20_0000, 0, 0, 0)).unwrap();
        assert_eq!(vm.stats().pages_4k, 1, "{f:?}: the neighbour's leaf went");
        let (seen, faults) = access(&mut v, 0x20_1000, false).unwrap();
        assert_eq!((seen, faults), (Seen::Ram(Pfn((RAM_HVA >> 12) + 1)), vec![]), "{f:?}");
        assert!(matches!(access(&mut v, 0x20_0000, false).unwrap().0, Seen::Mmio(_)), "{f:?}");
    }
}

/// The MMIO SPTEs of a zapped range: a host invalidation keeps them (KVM `tdp_mmu_zap_leafs`
/// skips non-present entries; they are guarded by the generation), a memslot delete clears
/// those inside its range. Here an MMIO SPTE made before a slot was created over its gfn: the
/// slot's host invalidation leaves it, the guest still reads the slot's RAM (the generation
/// moved), and the delete clears it. Kills, in `zap_entry`'s `whole && old != NONPRESENT &&
/// !is_frozen(old)`, `old != NONPRESENT` -> `==` and deleting the `!` of `!is_frozen` (the
/// delete left it), and `whole &&` -> `||` and `&& !is_frozen` -> `||` (the host invalidation
/// cleared it).
#[test]
fn a_host_invalidation_keeps_mmio_sptes_and_a_delete_clears_them() {
    use vmmu::Hva;
    const OLD: u64 = 0x20_3000;
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h) = vm(f);
        let mut v = vm.create_vcpu().unwrap();
        assert!(matches!(access(&mut v, OLD, false).unwrap().0, Seen::Mmio(_)), "{f:?}");
        // 16 pages over the MMIO SPTE's gfn: 4 KiB leaves in the same table.
        vm.set_memory_region(&region(0, 0x20_0000, 0x1_0000, RAM_HVA, 0)).unwrap();
        let five = Seen::Ram(Pfn((RAM_HVA >> 12) + 5));
        assert_eq!(access(&mut v, 0x20_5000, false).unwrap().0, five, "{f:?}");
        let root = v.root().unwrap().clone();
        assert!(spte_4k(&vm, &root, OLD).is_some(), "{f:?}: setup: the old MMIO SPTE");
        let inv = vm.invalidate_hva_range_begin(Hva(RAM_HVA), Hva(RAM_HVA + 0x1_0000));
        assert!(spte_4k(&vm, &root, OLD).is_some(), "{f:?}: the host invalidation cleared it");
        assert_eq!(spte_4k(&vm, &root, 0x20_5000), None, "{f:?}: the leaf stayed");
        inv.end();
        let three = Seen::Ram(Pfn((RAM_HVA >> 12) + 3));
        assert_eq!(access(&mut v, OLD, false).unwrap().0, three, "{f:?}");
        // The read replaced the old MMIO SPTE by a leaf; make another one, outside any slot, in
        // the same table, and a slot over it.
        const OTHER: u64 = 0x20_8000;
        vm.set_memory_region(&region(0, 0x20_0000, 0, 0, 0)).unwrap();
        assert!(matches!(access(&mut v, OTHER, false).unwrap().0, Seen::Mmio(_)), "{f:?}");
        vm.set_memory_region(&region(1, 0x20_8000, 0x1000, RAM_HVA + 0x8000, 0)).unwrap();
        let root = v.root().unwrap().clone();
        assert!(spte_4k(&vm, &root, OTHER).is_some(), "{f:?}: setup: the MMIO SPTE");
        vm.set_memory_region(&region(1, 0x20_8000, 0, 0, 0)).unwrap();
        assert_eq!(spte_4k(&vm, &root, OTHER), None, "{f:?}: the delete left the MMIO SPTE");
    }
}

/// A memslot delete that unlinks a table holding nothing present (only an old MMIO SPTE)
/// still flushes every vCPU's TLB (KVM: the paging-structure caches may hold the link; the
/// table is freed after the zap). Kills, in `zap_entry`, the unlink's `flush |= unlink ==
/// FlushNeed::Remote` -> `&=` and `==` -> `!=`.
#[test]
fn unlinking_a_table_with_nothing_present_flushes_the_other_vcpus() {
    for f in [FormatKind::Ept, FormatKind::Npt] {
        let (vm, _h) = vm(f);
        let mut v = vm.create_vcpu().unwrap();
        let mut w = vm.create_vcpu().unwrap();
        // Both vCPUs walk the 4 KiB table that holds v's MMIO SPTE.
        assert!(matches!(access(&mut v, 0x20_3000, false).unwrap().0, Seen::Mmio(_)), "{f:?}");
        assert!(matches!(access(&mut w, 0x20_3000, false).unwrap().0, Seen::Mmio(_)), "{f:?}");
        vm.set_memory_region(&region(0, 0x20_0000, 0x20_0000, RAM_HVA, 0)).unwrap();
        w.service_requests().unwrap();
        let before = vm.stats().remote_tlb_flush_requests;
        vm.set_memory_region(&region(0, 0x20_0000, 0, 0, 0)).unwrap();
        assert_eq!(vm.stats().tdp_tables_zapped, 1, "{f:?}: setup: the table went");
        assert_eq!(vm.stats().remote_tlb_flush_requests, before + 1, "{f:?}: no flush");
        assert!(w.service_requests().unwrap().flush_tlb, "{f:?}: w kept the unlinked table");
    }
}
