//! Every kind of memslot update out of heap at every allocation in turn: it answers `ENOMEM`
//! (or the error it would answer anyway) and changes nothing, or completes; never an abort.
//! The room an update needs in both memslot sets' indexes is made before it publishes
//! anything (`Memslots::make_room`); no edit of either set after that may allocate.
//!
//! The global allocator here fails every allocation of this thread after the first `granted`
//! while a thread-local switch is on (`common/failing_heap.rs`).
#![cfg(not(loom))]

use vmmu::memslot::{
    MemslotError, Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES,
};
use vmmu::srcu::ReaderId;
use vmmu::{AsId, Gfn, Hva};

#[path = "common/failing_heap.rs"]
mod failing_heap;

use failing_heap::{heap_for, Failing};

#[global_allocator]
static HEAP: Failing = Failing;

/// A slot as a reader of the published set sees it: `(as, id, base gfn, pages, hva, flags)`.
type Seen = (u16, u16, u64, u64, u64, u32);

/// The published slots of both address spaces, after checking that every index of each set
/// answers for every slot (by gfn, by id, by host range).
fn snapshot(m: &Memslots, r: &ReaderId) -> Vec<Seen> {
    let g = m.read(r);
    let mut all = Vec::new();
    for as_id in 0..m.nr_address_spaces() {
        let set = g.set(AsId(as_id));
        for s in set.iter() {
            assert!(!s.is_invalid(), "{s:?} left invalid");
            assert_eq!(set.find(s.base_gfn()).map(|f| f.id()), Some(s.id()), "by gfn: {s:?}");
            assert_eq!(set.find(Gfn(s.end_gfn().0 - 1)).map(|f| f.id()), Some(s.id()));
            assert_eq!(set.get(s.id()).map(|f| f.base_gfn()), Some(s.base_gfn()), "by id");
            let mut hits = 0;
            set.for_each_in_hva_range(s.userspace_addr(), Hva(s.userspace_addr().0 + 1), |f| {
                hits += usize::from(f.id() == s.id());
            });
            assert_eq!(hits, 1, "by host range: {s:?}");
            assert_eq!(s.dirty_logging(), set.dirty_bitmap(s.id()).is_some(), "bitmap {s:?}");
            let hva = s.userspace_addr().0;
            all.push((as_id, s.id().0, s.base_gfn().0, s.npages(), hva, s.user_flags()));
        }
        assert_eq!(set.len(), set.iter().count());
    }
    all
}

/// Runs `op` out of heap at every allocation in turn, until it runs with no allocation refused.
/// Each run answers `ENOMEM` (or `expected`, the error it answers with the heap it wants) and
/// changes nothing, or succeeds, and then `undo` (with the heap back) returns to the state
/// before, until the last run, whose change is kept. Returns how many runs answered `ENOMEM`.
fn every_allocation(
    m: &Memslots,
    r: &ReaderId,
    what: &str,
    op: UserspaceMemoryRegion,
    undo: Option<UserspaceMemoryRegion>,
    expected: Option<fn(&MemslotError) -> bool>,
) -> usize {
    let before = snapshot(m, r);
    let mut enomem = 0;
    for granted in 0..200 {
        let (out, failed) = heap_for(granted, || m.set_memory_region(&op, &NoHooks));
        match out {
            Err(MemslotError::OutOfMemory { .. }) => {
                assert!(failed > 0, "{what} {granted}: ENOMEM with nothing refused");
                assert_eq!(snapshot(m, r), before, "{what} {granted}: ENOMEM changed the slots");
                enomem += 1;
            }
            Err(e) if expected.is_some_and(|f| f(&e)) => {
                assert_eq!(snapshot(m, r), before, "{what} {granted}: {e} changed the slots");
                if failed == 0 {
                    return enomem;
                }
            }
            Err(e) => panic!("{what} {granted}: {e}"),
            Ok(_) => {
                assert!(expected.is_none(), "{what} {granted}: succeeded");
                let after = snapshot(m, r);
                assert_ne!(after, before, "{what} {granted}: nothing changed");
                if failed == 0 {
                    return enomem;
                }
                let undo = undo.unwrap_or_else(|| panic!("{what}: no undo"));
                m.set_memory_region(&undo, &NoHooks).unwrap();
                assert_eq!(snapshot(m, r), before, "{what} {granted}: undo");
            }
        }
    }
    panic!("{what}: no end to its allocations");
}

/// A slot of address space `as_id`: `pages` pages at gfn `gfn`, its host range at page
/// `hva_page` of a region no other slot's meets.
fn region(
    as_id: u16,
    id: u16,
    gfn: u64,
    pages: u64,
    hva_page: u64,
    flags: u32,
) -> UserspaceMemoryRegion {
    let slot = (u32::from(as_id) << 16) | u32::from(id);
    UserspaceMemoryRegion::new(
        slot,
        flags,
        gfn << 12,
        pages << 12,
        0x1_0000_0000 + (hva_page << 12),
    )
}

/// Every update kind, in both address spaces, with ids across the id table's pages and enough
/// slots for both indexes to split blocks (creates in front of the others), merge them
/// (deletes), and reuse the blocks and pages removals freed (creates after deletes); each
/// update out of heap at every allocation.
#[test]
fn every_memslot_update_kind_out_of_heap_at_every_allocation() {
    let m = Memslots::new(MemslotsConfig { max_gpa_bits: 40, ..MemslotsConfig::default() });
    let r = m.register_reader().unwrap();
    let mut enomem = 0;
    let n = 300u64;
    // Slot `i` of address space `a`: id across pages, gfns and host ranges in reverse order of
    // creation, so that each create goes in front of the others.
    let id = |i: u64| ((i * 97) % 32_000) as u16;
    let gfn = |i: u64| (n - i) * 16;
    let hva = |i: u64| (n - i) * 16;
    let create = |a: u16, i: u64, flags| region(a, id(i), gfn(i), 4, hva(i), flags);
    let delete = |a: u16, i: u64| region(a, id(i), gfn(i), 0, hva(i), 0);
    for i in 0..n {
        for a in [0u16, 1] {
            let flags = if i % 7 == 0 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            enomem +=
                every_allocation(&m, &r, "create", create(a, i, flags), Some(delete(a, i)), None);
        }
    }
    // Flags changes: logging on (a bitmap) and off.
    for i in (1..n).step_by(11) {
        for a in [0u16, 1] {
            let on = create(a, i, KVM_MEM_LOG_DIRTY_PAGES);
            let was = create(a, i, if i % 7 == 0 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 });
            if on == was {
                continue;
            }
            enomem += every_allocation(&m, &r, "flags on", on, Some(was), None);
            enomem += every_allocation(&m, &r, "flags off", was, Some(on), None);
        }
    }
    // Moves past other slots (remove and insert in the gfn index), and back.
    for i in (0..n).step_by(13) {
        for a in [0u16, 1] {
            let there = region(a, id(i), (n + 10 + i) * 16, 4, hva(i), 0);
            let back = create(a, i, 0);
            let was = create(a, i, if i % 7 == 0 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 });
            if was != back {
                continue; // a move keeps its flags here
            }
            enomem += every_allocation(&m, &r, "move", there, Some(back), None);
            enomem += every_allocation(&m, &r, "move back", back, Some(there), None);
            // A move that fails its prepare after the invalidation: beyond the max gfn, and
            // (out of heap) one that turns logging on as it moves.
            let beyond = region(a, id(i), (1 << 28) - 2, 4, hva(i), 0);
            let beyond_max = |e: &MemslotError| matches!(e, MemslotError::BeyondMaxGfn { .. });
            enomem += every_allocation(&m, &r, "move beyond", beyond, None, Some(beyond_max));
            let logged = region(a, id(i), (n + 10 + i) * 16, 4, hva(i), KVM_MEM_LOG_DIRTY_PAGES);
            enomem += every_allocation(&m, &r, "move logged", logged, Some(back), None);
            enomem += every_allocation(&m, &r, "move logged back", back, Some(logged), None);
        }
    }
    // Deletes, every other slot then the rest (blocks merge, pages empty), then creates again.
    for pass in [0, 1] {
        for i in (pass..n).step_by(2) {
            for a in [0u16, 1] {
                let flags = if i % 7 == 0 { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
                let again = create(a, i, flags);
                enomem += every_allocation(&m, &r, "delete", delete(a, i), Some(again), None);
            }
        }
    }
    assert!(snapshot(&m, &r).is_empty());
    for i in (0..n).rev() {
        for a in [1u16, 0] {
            enomem +=
                every_allocation(&m, &r, "create again", create(a, i, 0), Some(delete(a, i)), None);
        }
    }
    assert_eq!(snapshot(&m, &r).len(), 2 * n as usize);
    // Moves into a full block: slots created in address order above the others fill their last
    // block, and after each create the first of them moves into the gap before the last one
    // (past the others: a remove, then an insert that splits when the last block is full), and
    // back.
    let base = 1 << 20;
    for j in 0..140u64 {
        let (a, id) = (j as u16 % 2, 32_100 + j as u16 / 2);
        let gfn = base + (j / 2) * 16;
        let here = region(a, id, gfn, 4, gfn, 0);
        let gone = region(a, id, gfn, 0, gfn, 0);
        enomem += every_allocation(&m, &r, "create in order", here, Some(gone), None);
        if j < 4 {
            continue;
        }
        let first = region(a, 32_100, base, 4, base, 0);
        let gap = region(a, 32_100, base + (j / 2) * 16 - 8, 4, base, 0);
        enomem += every_allocation(&m, &r, "move into a full block", gap, Some(first), None);
        enomem += every_allocation(&m, &r, "move out of it", first, Some(gap), None);
    }
    eprintln!("{enomem} updates answered ENOMEM");
    assert!(enomem > 0, "no update ran out of heap: the test proves nothing");
}
