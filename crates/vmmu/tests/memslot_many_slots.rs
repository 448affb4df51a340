//! Property test at scale: hundreds of slots (so the gfn index has many blocks, splits and
//! merges), created, moved and deleted at random, against a plain vector. Every gfn's lookup,
//! range queries and the overlap rule (`EEXIST`) must agree after every step. The small-limit
//! model of every rule is `memslot_model.rs`; this one is about the index under many slots.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use proptest::prelude::*;
use vmmu::memslot::{Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion};
use vmmu::{AsId, Gfn};

/// Slot ids in use.
const IDS: u32 = 400;
/// Guest frames the slots may cover.
const GFNS: u64 = 1600;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Create slot `id` at `base` with `npages` (or move it there, keeping its size, if it exists).
    Set {
        id: u32,
        base: u64,
        npages: u64,
    },
    Delete {
        id: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..IDS, 0..GFNS - 4, 1u64..4).prop_map(|(id, base, npages)| Op::Set { id, base, npages }),
        1 => (0..IDS).prop_map(|id| Op::Delete { id }),
    ]
}

/// The model: `(id, base, npages)` of each slot.
#[derive(Default)]
struct Model(Vec<(u32, u64, u64)>);

impl Model {
    fn get(&self, id: u32) -> Option<(u32, u64, u64)> {
        self.0.iter().copied().find(|s| s.0 == id)
    }
    fn overlaps(&self, id: u32, base: u64, npages: u64) -> bool {
        self.0.iter().any(|&(i, b, n)| i != id && b < base + npages && base < b + n)
    }
    fn find(&self, gfn: u64) -> Option<(u32, u64, u64)> {
        self.0.iter().copied().find(|&(_, b, n)| b <= gfn && gfn < b + n)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn lookups_and_overlaps_agree_with_a_vector(ops in prop::collection::vec(op(), 200..1200)) {
        let m = Memslots::new(MemslotsConfig { max_readers: 1, ..Default::default() });
        let reader = m.register_reader().unwrap();
        let mut model = Model::default();
        for (step, o) in ops.iter().enumerate() {
            let (id, base, npages) = match *o {
                // A re-set of an existing slot keeps its size: a move.
                Op::Set { id, base, npages } => (id, base, model.get(id).map_or(npages, |s| s.2)),
                Op::Delete { id } => (id, 0, 0),
            };
            let r = UserspaceMemoryRegion {
                slot: id,
                flags: 0,
                guest_phys_addr: base << 12,
                memory_size: npages << 12,
                userspace_addr: u64::from(id) << 24,
            };
            let got = m.set_memory_region(&r, &NoHooks).map_err(|e| e.errno());
            let want = match *o {
                // Deleting a missing slot is EINVAL (KVM: no old slot for a zero size).
                Op::Delete { id } if model.get(id).is_none() => Err("EINVAL"),
                Op::Delete { id } => {
                    model.0.retain(|s| s.0 != id);
                    Ok(())
                }
                Op::Set { .. } if model.overlaps(id, base, npages) => Err("EEXIST"),
                Op::Set { .. } => {
                    model.0.retain(|s| s.0 != id);
                    model.0.push((id, base, npages));
                    Ok(())
                }
            };
            prop_assert_eq!(got.map(|_| ()), want, "step {} {:?}", step, o);
            if step % 25 != 0 && step + 1 != ops.len() {
                continue;
            }
            let g = m.read(&reader);
            let set = g.set(AsId(0));
            prop_assert_eq!(set.len(), model.0.len());
            for gfn in 0..GFNS {
                let got = set.find(Gfn(gfn)).map(|s| (u32::from(s.id().0), s.base_gfn().0, s.npages()));
                prop_assert_eq!(got, model.find(gfn), "step {} gfn {}", step, gfn);
            }
            let mut bases: Vec<u64> = model.0.iter().map(|s| s.1).collect();
            bases.sort_unstable();
            prop_assert!(set.iter().map(|s| s.base_gfn().0).eq(bases.iter().copied()));
            for (lo, hi) in [(0, GFNS), (5, 6), (100, 400), (GFNS / 2, GFNS / 2 + 77)] {
                let got: Vec<u64> = set.iter_range(Gfn(lo), Gfn(hi)).map(|s| s.base_gfn().0).collect();
                let want: Vec<u64> = bases.iter().copied()
                    .filter(|&b| model.0.iter().any(|&(_, mb, n)| mb == b && b < hi && lo < b + n))
                    .collect();
                prop_assert_eq!(got, want, "step {} range {}..{}", step, lo, hi);
            }
        }
    }
}
