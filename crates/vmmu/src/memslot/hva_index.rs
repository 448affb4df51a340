//! The slots of one memslot set by host-virtual range (KVM's `hva_tree`, an interval tree): which
//! slots map part of a host range, for host invalidations (the MMU notifier), in `O(log n + k)`
//! for `k` slots found, where a scan of every slot cost `O(n)` per invalidation.
//!
//! A treap keyed by `(hva start, slot id)` (host ranges of slots may overlap: aliases), each node
//! holding its slot's end and the largest end in its subtree, so that a query skips every subtree
//! that ends at or before the range and every right subtree that starts at or after it. A node's
//! priority is a hash of its key (no random source in `no_std`): the tree has the shape of a
//! random binary search tree, expected depth `O(log n)`, for any keys not chosen against the
//! hash (another hash would give the same answers, only another shape). Recursion
//! (insert, remove, query, drop) is as deep as the tree.
//!
//! Invariants, kept by every operation: keys are in binary-search-tree order; priorities are in
//! heap order (a parent's at least its children's); `max_end` is the largest `end` of the node's
//! subtree; the spare node (the last one removed, kept for the next insert) is in no tree. Only
//! the memslot set's `replace` (the slots-lock holder, on a set no reader can reach)
//! changes it.

use crate::types::SlotId;
use alloc::boxed::Box;
use core::cmp::Ordering;

type Link = Option<Box<Node>>;

#[derive(Debug)]
struct Node {
    start: u64,
    id: u16,
    end: u64,
    max_end: u64,
    prio: u64,
    left: Link,
    right: Link,
}

impl Node {
    fn key(&self) -> (u64, u16) {
        (self.start, self.id)
    }

    /// Recomputes `max_end` from the node and its children.
    fn update(&mut self) {
        let mut m = self.end;
        for c in [&self.left, &self.right].into_iter().flatten() {
            m = m.max(c.max_end);
        }
        self.max_end = m;
    }
}

/// The priority of a key: splitmix64 of the key, so keys a fixed stride apart (slots carved from
/// one buffer) still get unrelated priorities.
fn priority(start: u64, id: u16) -> u64 {
    let mut z = start ^ (u64::from(id) << 48) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Splits `t` into the keys below `k` and the keys at or above it.
fn split(t: Link, k: (u64, u16)) -> (Link, Link) {
    match t {
        None => (None, None),
        Some(mut n) => {
            if n.key() < k {
                let (l, r) = split(n.right.take(), k);
                n.right = l;
                n.update();
                (Some(n), r)
            } else {
                let (l, r) = split(n.left.take(), k);
                n.left = r;
                n.update();
                (l, Some(n))
            }
        }
    }
}

/// Joins `a` and `b`, every key of `a` below every key of `b`.
fn merge(a: Link, b: Link) -> Link {
    match (a, b) {
        (None, b) => b,
        (a, None) => a,
        (Some(mut a), Some(mut b)) => {
            if a.prio >= b.prio {
                a.right = merge(a.right.take(), Some(b));
                a.update();
                Some(a)
            } else {
                b.left = merge(Some(a), b.left.take());
                b.update();
                Some(b)
            }
        }
    }
}

fn insert(t: &mut Link, mut node: Box<Node>) {
    let descend = match t.as_deref() {
        None => None,
        Some(n) => (node.prio <= n.prio).then(|| node.key() < n.key()),
    };
    if let (Some(left), Some(n)) = (descend, t.as_mut()) {
        insert(if left { &mut n.left } else { &mut n.right }, node);
        n.update();
        return;
    }
    // Empty, or the new node outranks this subtree's root: it becomes the root.
    let (l, r) = split(t.take(), node.key());
    node.left = l;
    node.right = r;
    node.update();
    *t = Some(node);
}

/// Removes the node with key `k`; returns it, unlinked, if it was there.
fn remove(t: &mut Link, k: (u64, u16)) -> Link {
    let n = t.as_mut()?;
    let gone = match k.cmp(&n.key()) {
        Ordering::Less => remove(&mut n.left, k),
        Ordering::Greater => remove(&mut n.right, k),
        Ordering::Equal => {
            let mut gone = t.take()?;
            *t = merge(gone.left.take(), gone.right.take());
            return Some(gone);
        }
    };
    if gone.is_some() {
        n.update();
    }
    gone
}

fn overlapping(t: &Link, start: u64, end: u64, f: &mut dyn FnMut(SlotId)) {
    let Some(n) = t.as_deref() else { return };
    if n.max_end <= start {
        return; // everything below ends at or before the range
    }
    overlapping(&n.left, start, end, f);
    if n.start < end {
        if n.end > start {
            f(SlotId(n.id));
        }
        // The right subtree starts at or after this node.
        overlapping(&n.right, start, end, f);
    }
}

/// The index: slot id by host range `[start, end)`.
#[derive(Debug, Default)]
pub(crate) struct HvaIndex {
    root: Link,
    len: usize,
    /// The last node removed, reused by the next insert: a slot deleted and created again (a
    /// VMM's remap) allocates nothing.
    spare: Link,
}

impl HvaIndex {
    /// Adds slot `id` mapping host addresses `[start, end)` (`start < end`). The key must not be
    /// present (the set removes a slot before it adds its replacement, and checks in debug
    /// builds that the index holds as many slots as the set).
    pub(crate) fn insert(&mut self, id: SlotId, start: u64, end: u64) {
        debug_assert!(start < end, "a slot maps at least one page");
        let fresh = Node {
            start,
            id: id.0,
            end,
            max_end: end,
            prio: priority(start, id.0),
            left: None,
            right: None,
        };
        let node = match self.spare.take() {
            Some(mut n) => {
                *n = fresh;
                n
            }
            None => Box::new(fresh),
        };
        insert(&mut self.root, node);
        self.len += 1;
    }

    /// Removes slot `id` that starts at host address `start`; whether it was there.
    pub(crate) fn remove(&mut self, id: SlotId, start: u64) -> bool {
        let Some(gone) = remove(&mut self.root, (start, id.0)) else { return false };
        self.len -= 1;
        self.spare = Some(gone);
        true
    }

    /// Calls `f` with every slot whose host range meets `[start, end)`, by host start.
    pub(crate) fn overlapping(&self, start: u64, end: u64, f: &mut dyn FnMut(SlotId)) {
        if start < end {
            overlapping(&self.root, start, end, f);
        }
    }

    /// The number of slots indexed.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The tree's depth (tests: the shape stays logarithmic).
    #[cfg(all(test, not(loom)))]
    fn depth(&self) -> usize {
        fn d(t: &Link) -> usize {
            t.as_deref().map_or(0, |n| 1 + d(&n.left).max(d(&n.right)))
        }
        d(&self.root)
    }

    /// Checks the invariants of the module doc (tests).
    #[cfg(all(test, not(loom)))]
    fn check(&self) {
        fn walk(t: &Link, lo: Option<(u64, u16)>, hi: Option<(u64, u16)>, prio: u64) -> usize {
            let Some(n) = t.as_deref() else { return 0 };
            assert!(lo.is_none_or(|lo| n.key() > lo) && hi.is_none_or(|hi| n.key() < hi));
            assert!(n.prio <= prio, "heap order");
            let mut m = n.end;
            for c in [&n.left, &n.right].into_iter().flatten() {
                m = m.max(c.max_end);
            }
            assert_eq!(n.max_end, m, "max_end of {:?}", n.key());
            1 + walk(&n.left, lo, Some(n.key()), n.prio) + walk(&n.right, Some(n.key()), hi, n.prio)
        }
        assert_eq!(walk(&self.root, None, None, u64::MAX), self.len);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn found(ix: &HvaIndex, start: u64, end: u64) -> Vec<u16> {
        let mut v = Vec::new();
        ix.overlapping(start, end, &mut |id| v.push(id.0));
        v
    }

    #[test]
    fn finds_exactly_the_slots_meeting_the_range() {
        let mut ix = HvaIndex::default();
        ix.insert(SlotId(1), 0x1000, 0x3000);
        ix.insert(SlotId(2), 0x3000, 0x4000);
        ix.insert(SlotId(3), 0x0, 0x10_0000); // an alias over both
        ix.insert(SlotId(4), 0x2000, 0x3000); // inside slot 1's range
        ix.check();
        assert_eq!(found(&ix, 0x2fff, 0x3001), [3, 1, 4, 2]);
        assert_eq!(found(&ix, 0x3000, 0x3001), [3, 2], "an end is exclusive");
        assert_eq!(found(&ix, 0x10_0000, 0x20_0000), [] as [u16; 0]);
        assert_eq!(found(&ix, 0x5000, 0x5000), [] as [u16; 0], "an empty range meets nothing");
        assert!(ix.remove(SlotId(3), 0x0));
        assert!(!ix.remove(SlotId(3), 0x0), "removed once");
        assert!(!ix.remove(SlotId(1), 0x2000), "the key is the start and the id");
        assert_eq!(found(&ix, 0x0, 0x1_0000), [1, 4, 2]);
        assert_eq!(ix.len(), 3);
        ix.check();
    }

    /// 32764 slots carved from one buffer (memslot_perf_test's layout) give a shallow tree.
    #[test]
    fn a_stride_of_slots_stays_shallow() {
        let mut ix = HvaIndex::default();
        for i in 0..32764u64 {
            ix.insert(
                SlotId(i as u16),
                0x7f00_0000_0000 + i * 0x4000,
                0x7f00_0000_4000 + i * 0x4000,
            );
        }
        ix.check();
        assert!(ix.depth() < 60, "depth {}", ix.depth());
        assert_eq!(found(&ix, 0x7f00_0000_4100, 0x7f00_0000_4200), [1]);
        for i in (0..32764u64).step_by(2) {
            assert!(ix.remove(SlotId(i as u16), 0x7f00_0000_0000 + i * 0x4000));
        }
        ix.check();
        assert_eq!(ix.len(), 16382);
        assert!(ix.depth() < 60, "depth {}", ix.depth());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16, u64, u64),
        Remove(usize),
        Query(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..64, 0u64..64, 1u64..16).prop_map(|(id, s, n)| Op::Insert(id, s, s + n)),
            (0usize..64).prop_map(Op::Remove),
            (0u64..80, 0u64..16).prop_map(|(s, n)| Op::Query(s, s + n)),
        ]
    }

    proptest! {
        /// Against a list of (id, start, end): every query finds exactly the slots that meet
        /// it, in host-start order, after any sequence of inserts and removes.
        #[test]
        fn agrees_with_a_scan(ops in proptest::collection::vec(op(), 1..200)) {
            let mut ix = HvaIndex::default();
            let mut model: Vec<(u16, u64, u64)> = Vec::new();
            for o in ops {
                match o {
                    Op::Insert(id, s, e) => {
                        if !model.iter().any(|m| (m.0, m.1) == (id, s)) {
                            ix.insert(SlotId(id), s, e);
                            model.push((id, s, e));
                        }
                    }
                    Op::Remove(i) => {
                        if let Some(&(id, s, _)) = model.get(i) {
                            prop_assert!(ix.remove(SlotId(id), s));
                            model.remove(i);
                        } else {
                            prop_assert!(!ix.remove(SlotId(999), i as u64));
                        }
                    }
                    Op::Query(s, e) => {
                        let mut want: Vec<(u64, u16)> = model
                            .iter()
                            .filter(|m| s < e && m.1 < e && m.2 > s)
                            .map(|m| (m.1, m.0))
                            .collect();
                        want.sort_unstable();
                        let want: Vec<u16> = want.into_iter().map(|w| w.1).collect();
                        prop_assert_eq!(found(&ix, s, e), want);
                    }
                }
                ix.check();
                prop_assert_eq!(ix.len(), model.len());
            }
        }
    }
}
