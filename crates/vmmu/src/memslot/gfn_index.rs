//! The gfn index of a memslot set (KVM's `gfn_tree`): the set's slots ordered by base gfn, for
//! the lookup every fault and every MMIO slow path makes (KVM `search_memslots`).
//!
//! Layout: a two-level sorted structure, a B+tree of height two. The slots lie in blocks of at
//! most [`CAP`] entries; a block holds its base gfns inline (512 bytes) and its slots in a
//! separate array, so that the memory a search reads is small: at KVM's 32764 slots the keys of
//! all blocks take about 350-520 KiB (blocks 3/4 to 1/2 full), which a core's L2 can hold, where
//! keys and slots together would not. `firsts` holds each block's first base gfn (a few KiB).
//! A lookup is a binary search of `firsts`, a search of the block's keys that reads two of their
//! cache lines (the first key of each group of eight, kept together in `sums`, then one group:
//! six branch-free halvings), and one read of the slot; a `BTreeMap` (11 entries a node, slots
//! inline) descends five or six nodes at that size.
//!
//! Invariants (checked by `check` in tests after every edit):
//! - base gfns are unique and, read block by block, strictly increasing;
//! - `firsts[i] == blocks[i].keys[0]`, and no block is empty;
//! - in a block, keys `len..` are `u64::MAX` and `sums[g] == keys[8 * g]` (`Block::seal`, called
//!   by every edit of a block);
//! - when there is more than one block, every block holds at least [`MIN`] entries, so `firsts`
//!   has at most `n / MIN + 1` entries and an edit's cost is bounded by `CAP` (moves in a
//!   block) plus, on a split or a merge, `n / MIN` (moves in `firsts` and `blocks`): flat in
//!   practice, a few microseconds at the worst at 32764 slots.
//!
//! Only `MemslotSet::replace` edits the index, on a set no reader can reach; lookups take `&self`
//! and allocate nothing. An insert allocates nothing once given room ([`GfnIndex::room`], made
//! fallibly before a memslot update publishes anything, and [`GfnIndex::take_room`]).

use super::slot::Memslot;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Entries a block holds at most.
const CAP: usize = 64;
/// Entries a block holds at least when it is not the only one.
const MIN: usize = CAP / 4;

/// Keys a group holds: a block's search reads one group's first keys, then one group.
const GROUP: usize = 8;
/// Groups a block holds.
const GROUPS: usize = CAP / GROUP;

/// A run of consecutive slots, at most [`CAP`]. Keys `len..` are `u64::MAX` (no base gfn is) and
/// their slots unused copies; `sums[g] == keys[g * GROUP]`, the groups' first keys in one cache
/// line, so that a search reads two lines of keys rather than one per halving.
struct Block {
    len: usize,
    sums: [u64; GROUPS],
    keys: [u64; CAP],
    slots: Box<[Memslot; CAP]>,
}

impl Block {
    /// A block holding `first` alone: `spare` if there is one, else a new one.
    fn with(first: Memslot, spare: &mut Option<Box<Block>>) -> Box<Block> {
        let mut b = match spare.take() {
            Some(mut b) => {
                let old_len = b.len;
                b.len = 0;
                b.seal(old_len);
                b.slots[0] = first;
                b
            }
            None => Box::new(Block::empty(first)),
        };
        b.keys[0] = first.base_gfn().raw();
        b.len = 1;
        b.seal(1);
        b
    }

    /// An empty block, its unused slots copies of `filler`.
    fn empty(filler: Memslot) -> Block {
        Block {
            len: 0,
            sums: [u64::MAX; GROUPS],
            keys: [u64::MAX; CAP],
            slots: Box::new([filler; CAP]),
        }
    }

    /// [`Self::empty`], or `None` if the heap has no room for it.
    fn try_empty(filler: Memslot) -> Option<Box<Block>> {
        let slots = crate::heap::try_box([filler; CAP])?;
        crate::heap::try_box(Block {
            len: 0,
            sums: [u64::MAX; GROUPS],
            keys: [u64::MAX; CAP],
            slots,
        })
    }

    /// Restores the padding and `sums` after an edit that left `len` entries, `old_len` before.
    fn seal(&mut self, old_len: usize) {
        if old_len > self.len {
            self.keys[self.len..old_len].fill(u64::MAX);
        }
        for g in 0..GROUPS {
            self.sums[g] = self.keys[g * GROUP];
        }
    }

    /// The position of the last key `<= gfn`, given `keys[0] <= gfn`: three halvings of `sums`,
    /// then three of one group, without branches.
    #[inline]
    fn position(&self, gfn: u64) -> usize {
        let mut g = 0;
        g += 4 * usize::from(self.sums[4] <= gfn);
        g += 2 * usize::from(self.sums[(g + 2) % GROUPS] <= gfn);
        g += usize::from(self.sums[(g + 1) % GROUPS] <= gfn);
        let mut i = g * GROUP;
        i += 4 * usize::from(self.keys[(i + 4) % CAP] <= gfn);
        i += 2 * usize::from(self.keys[(i + 2) % CAP] <= gfn);
        i += usize::from(self.keys[(i + 1) % CAP] <= gfn);
        // Padding counts only for gfn == u64::MAX.
        i.min(self.len - 1)
    }

    #[cfg(test)]
    fn keys(&self) -> &[u64] {
        &self.keys[..self.len]
    }

    #[inline]
    fn slots(&self) -> &[Memslot] {
        &self.slots[..self.len]
    }

    /// Inserts `s` at position `i`; the block is not full.
    fn insert_at(&mut self, i: usize, s: Memslot) {
        debug_assert!(self.len < CAP && i <= self.len);
        self.keys.copy_within(i..self.len, i + 1);
        self.slots.copy_within(i..self.len, i + 1);
        self.keys[i] = s.base_gfn().raw();
        self.slots[i] = s;
        self.len += 1;
        self.seal(self.len);
    }

    /// Removes and returns the entry at `i`.
    fn remove_at(&mut self, i: usize) -> Memslot {
        debug_assert!(i < self.len);
        let s = self.slots[i];
        self.keys.copy_within(i + 1..self.len, i);
        self.slots.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.seal(self.len + 1);
        s
    }

    /// Appends `other[from..to]`; the entries fit.
    fn append(&mut self, other: &Block, from: usize, to: usize) {
        let n = to - from;
        debug_assert!(self.len + n <= CAP);
        self.keys[self.len..self.len + n].copy_from_slice(&other.keys[from..to]);
        self.slots[self.len..self.len + n].copy_from_slice(&other.slots[from..to]);
        self.len += n;
        self.seal(self.len);
    }

    /// Moves the entries from `at` on into a new block.
    fn split_off(&mut self, at: usize, spare: &mut Option<Box<Block>>) -> Box<Block> {
        debug_assert!(0 < at && at < self.len);
        let mut right = Block::with(self.slots[at], spare);
        right.len = 0;
        right.append(self, at, self.len);
        let old_len = self.len;
        self.len = at;
        self.seal(old_len);
        right
    }
}

/// Slots by base gfn (see the module doc).
#[derive(Default)]
pub(crate) struct GfnIndex {
    /// `firsts[i]` is `blocks[i]`'s first base gfn.
    firsts: Vec<u64>,
    #[expect(clippy::vec_box, reason = "a split or merge moves pointers, not 2.5 KiB blocks")]
    blocks: Vec<Box<Block>>,
    len: usize,
    /// Where the last edit put or took a slot: `(block, position)`. A hint for the next edit,
    /// which a VMM often makes at the same place (a slot deleted and created again, moved and
    /// moved back, invalidated then deleted); every use checks it against the keys around it
    /// ([`Self::locate_edit`]), so a stale finger costs a search, never a wrong answer.
    finger: Option<(usize, usize)>,
    /// A block for the next split or first block, so that an insert given [`GfnRoom`] allocates
    /// nothing; a block a removal frees is kept here.
    spare: Option<Box<Block>>,
}

/// What one more insert into a [`GfnIndex`] needs from the heap, made ahead of time
/// ([`GfnIndex::room`]) and handed over without allocating ([`GfnIndex::take_room`]).
pub(crate) struct GfnRoom {
    block: Option<Box<Block>>,
    firsts: Option<Vec<u64>>,
    #[expect(clippy::vec_box, reason = "the room of `GfnIndex::blocks`")]
    blocks: Option<Vec<Box<Block>>>,
}

impl GfnIndex {
    /// Bytes of a block (its keys and its slots).
    pub(crate) const BLOCK_BYTES: usize =
        core::mem::size_of::<Block>() + core::mem::size_of::<[Memslot; CAP]>();

    /// What one more insert needs that the index lacks, allocated fallibly (`None`: the heap has
    /// no room); `filler` fills a new block's unused slots. Changes nothing: a reader may be
    /// reading the index meanwhile.
    pub(crate) fn room(&self, filler: Memslot) -> Option<GfnRoom> {
        let block = match self.spare {
            Some(_) => None,
            None => Some(Block::try_empty(filler)?),
        };
        Some(GfnRoom {
            block,
            firsts: crate::heap::vec_room(&self.firsts, 1)?,
            blocks: crate::heap::vec_room(&self.blocks, 1)?,
        })
    }

    /// Whether the next insert allocates nothing already (then [`Self::room`] would make
    /// nothing).
    pub(crate) fn has_room(&self) -> bool {
        use crate::heap::has_vec_room;
        self.spare.is_some() && has_vec_room(&self.firsts, 1) && has_vec_room(&self.blocks, 1)
    }

    /// Takes `room` in: the next insert allocates nothing. Allocates nothing.
    pub(crate) fn take_room(&mut self, room: GfnRoom) {
        if self.spare.is_none() {
            self.spare = room.block;
        }
        crate::heap::take_vec_room(&mut self.firsts, room.firsts);
        crate::heap::take_vec_room(&mut self.blocks, room.blocks);
    }
}

impl core::fmt::Debug for GfnIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_map().entries(self.iter().map(|s| (s.base_gfn().raw(), s))).finish()
    }
}

impl GfnIndex {
    /// The number of slots.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The block and position of the last slot whose base gfn is `<= gfn`.
    #[inline]
    fn locate(&self, gfn: u64) -> Option<(usize, usize)> {
        let b = self.firsts.partition_point(|&k| k <= gfn).checked_sub(1)?;
        // `keys[0] == firsts[b] <= gfn`.
        Some((b, self.blocks[b].position(gfn)))
    }

    /// [`Self::locate`] for an edit, or for the slots lock holder's checks: through the finger
    /// when the keys around it show it is the answer (a few reads in one block), else a search.
    /// The answer is the same either way, so edits shape the index as without a finger.
    #[inline]
    fn locate_edit(&self, gfn: u64) -> Option<(usize, usize)> {
        if let Some(found) = self.at_finger(gfn) {
            return found;
        }
        self.locate(gfn)
    }

    /// `Some(locate(gfn))` when the finger proves it: the finger's key is `gfn`, or `gfn` lies
    /// strictly between the keys before the finger and at it. `None` when it cannot tell.
    fn at_finger(&self, gfn: u64) -> Option<Option<(usize, usize)>> {
        let (b, i) = self.finger?;
        let block = self.blocks.get(b)?;
        if i > block.len {
            return None;
        }
        if i < block.len && block.keys[i] == gfn {
            return Some(Some((b, i)));
        }
        let prev = match (i, b) {
            (0, 0) => None,
            (0, _) => {
                let p = &self.blocks[b - 1];
                Some(((b - 1, p.len - 1), p.keys[p.len - 1]))
            }
            _ => Some(((b, i - 1), block.keys[i - 1])),
        };
        let next = match i < block.len {
            true => Some(block.keys[i]),
            false => self.firsts.get(b + 1).copied(),
        };
        let below = prev.is_none_or(|(_, k)| k < gfn);
        let above = next.is_none_or(|k| gfn < k);
        (below && above).then_some(prev.map(|(at, _)| at))
    }

    /// The slot with the greatest base gfn `<= gfn`, if any (whether it holds `gfn` is the
    /// caller's check).
    #[inline]
    pub(crate) fn last_at_or_below(&self, gfn: u64) -> Option<&Memslot> {
        let (b, i) = self.locate(gfn)?;
        Some(&self.blocks[b].slots[i])
    }

    /// The slot whose base gfn is `base`, if any.
    #[cfg(test)]
    pub(crate) fn get(&self, base: u64) -> Option<&Memslot> {
        let (b, i) = self.locate(base)?;
        (self.blocks[b].keys[i] == base).then(|| &self.blocks[b].slots[i])
    }

    /// All slots, by base gfn.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Memslot> + '_ {
        self.blocks.iter().flat_map(|b| b.slots().iter())
    }

    /// The slots from the last one whose base gfn is `<= gfn` (from the first slot if there is
    /// none) to the end, by base gfn: one search, then a walk.
    pub(crate) fn iter_from(&self, gfn: u64) -> impl Iterator<Item = &Memslot> + '_ {
        self.iter_at(self.locate(gfn))
    }

    /// [`Self::iter_from`] for the slots lock holder (overlap checks): the first search through
    /// the finger.
    pub(crate) fn iter_from_edit(&self, gfn: u64) -> impl Iterator<Item = &Memslot> + '_ {
        self.iter_at(self.locate_edit(gfn))
    }

    /// The slots from `at` (a [`Self::locate`] answer; the first slot when `None`) to the end.
    fn iter_at(&self, at: Option<(usize, usize)>) -> impl Iterator<Item = &Memslot> + '_ {
        let (b, i) = at.unwrap_or((0, 0));
        self.blocks
            .get(b..)
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .flat_map(move |(j, blk)| blk.slots()[if j == 0 { i } else { 0 }..].iter())
    }

    /// Inserts `s` under its base gfn; returns the slot it replaced there, if any.
    pub(crate) fn insert(&mut self, s: Memslot) -> Option<Memslot> {
        let key = s.base_gfn().raw();
        let (b, i) = match self.locate_edit(key) {
            None if self.blocks.is_empty() => {
                self.blocks.push(Block::with(s, &mut self.spare));
                self.firsts.push(key);
                self.len = 1;
                self.finger = Some((0, 0));
                return None;
            }
            // Below every slot: the front of the first block.
            None => (0, 0),
            Some((b, i)) if self.blocks[b].keys[i] == key => {
                self.finger = Some((b, i));
                return Some(core::mem::replace(&mut self.blocks[b].slots[i], s));
            }
            Some((b, i)) => (b, i + 1),
        };
        let (b, i) = if self.blocks[b].len == CAP {
            // Split evenly, except at a block's ends: slots created in address order (as a VMM
            // lays out RAM) then fill blocks to 3/4 rather than to half.
            let at = match i {
                0 => MIN,
                CAP => CAP - MIN,
                _ => CAP / 2,
            };
            let right = self.blocks[b].split_off(at, &mut self.spare);
            self.firsts.insert(b + 1, right.keys[0]);
            self.blocks.insert(b + 1, right);
            if i > at {
                (b + 1, i - at)
            } else {
                (b, i)
            }
        } else {
            (b, i)
        };
        self.blocks[b].insert_at(i, s);
        self.firsts[b] = self.blocks[b].keys[0];
        self.len += 1;
        self.finger = Some((b, i));
        None
    }

    /// Replaces the slot whose base gfn is `old_base` by `s` (a move when `s`'s base differs);
    /// returns the slot replaced, if there was one. A slot that keeps its place in the order (no
    /// other slot's base lies between the two bases: a flags change, an invalidation, most
    /// moves) is overwritten in place; any other is removed and inserted.
    pub(crate) fn rebase(&mut self, old_base: u64, s: Memslot) -> Option<Memslot> {
        let key = s.base_gfn().raw();
        let (b, i) = self.locate_edit(old_base)?;
        if self.blocks[b].keys[i] != old_base {
            return None;
        }
        let block = &self.blocks[b];
        let prev = match i {
            0 => b.checked_sub(1).map(|p| self.blocks[p].keys[self.blocks[p].len - 1]),
            _ => Some(block.keys[i - 1]),
        };
        let next = match i + 1 < block.len {
            true => Some(block.keys[i + 1]),
            false => self.firsts.get(b + 1).copied(),
        };
        if prev.is_none_or(|p| p < key) && next.is_none_or(|n| key < n) {
            let block = &mut self.blocks[b];
            block.keys[i] = key;
            block.seal(block.len);
            if i == 0 {
                self.firsts[b] = key;
            }
            self.finger = Some((b, i));
            return Some(core::mem::replace(&mut block.slots[i], s));
        }
        let old = self.remove(old_base);
        let clash = self.insert(s);
        debug_assert!(clash.is_none(), "a rebase onto another slot's base");
        old
    }

    /// Removes the slot whose base gfn is `base`, if any.
    pub(crate) fn remove(&mut self, base: u64) -> Option<Memslot> {
        let (b, i) = self.locate_edit(base)?;
        if self.blocks[b].keys[i] != base {
            return None;
        }
        let s = self.blocks[b].remove_at(i);
        self.len -= 1;
        // Where the slot was (its key would go back there), unless blocks change below.
        self.finger = Some((b, i));
        if self.blocks[b].len == 0 {
            // Only the last block can empty (others hold MIN > 1 entries before a removal).
            let gone = self.blocks.remove(b);
            self.spare.get_or_insert(gone);
            self.firsts.remove(b);
            self.finger = None;
        } else {
            self.firsts[b] = self.blocks[b].keys[0];
            if self.blocks[b].len < MIN && self.blocks.len() > 1 {
                self.rebalance(if b > 0 { b - 1 } else { b });
                self.finger = None;
            }
        }
        Some(s)
    }

    /// Restores `MIN` for blocks `l` and `l + 1`, one of which fell below it: merges them when
    /// their entries fit one block, else moves entries so that each holds half.
    fn rebalance(&mut self, l: usize) {
        let (ll, rl) = (self.blocks[l].len, self.blocks[l + 1].len);
        if ll + rl <= CAP {
            let right = self.blocks.remove(l + 1);
            self.firsts.remove(l + 1);
            self.blocks[l].append(&right, 0, rl);
            self.spare.get_or_insert(right);
            return;
        }
        let want = (ll + rl) / 2;
        let (left, rest) = self.blocks.split_at_mut(l + 1);
        let (left, right) = (&mut left[l], &mut rest[0]);
        if ll < want {
            // Move the right block's first `want - ll` entries to the left block's end.
            let n = want - ll;
            left.append(right, 0, n);
            right.keys.copy_within(n..rl, 0);
            right.slots.copy_within(n..rl, 0);
            right.len = rl - n;
            right.seal(rl);
        } else {
            // Move the left block's last `ll - want` entries to the right block's front.
            let n = ll - want;
            right.keys.copy_within(0..rl, n);
            right.slots.copy_within(0..rl, n);
            right.keys[..n].copy_from_slice(&left.keys[want..ll]);
            right.slots[..n].copy_from_slice(&left.slots[want..ll]);
            right.len = rl + n;
            right.seal(right.len);
            left.len = want;
            left.seal(ll);
        }
        self.firsts[l + 1] = self.blocks[l + 1].keys[0];
    }

    /// Panics unless the invariants of the module doc hold.
    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.firsts.len(), self.blocks.len());
        let mut prev: Option<u64> = None;
        let mut n = 0;
        for (first, b) in self.firsts.iter().zip(&self.blocks) {
            assert!(b.len >= 1 && b.len <= CAP);
            assert!(self.blocks.len() == 1 || b.len >= MIN, "block of {} entries", b.len);
            assert_eq!(*first, b.keys[0]);
            assert!(b.keys[b.len..].iter().all(|&k| k == u64::MAX), "padding");
            for g in 0..GROUPS {
                assert_eq!(b.sums[g], b.keys[g * GROUP], "sums");
            }
            for (k, s) in b.keys().iter().zip(b.slots()) {
                assert_eq!(*k, s.base_gfn().raw());
                assert!(prev.is_none_or(|p| p < *k), "keys out of order");
                prev = Some(*k);
            }
            n += b.len;
        }
        assert_eq!(n, self.len);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::types::{AsId, Gfn, Hva, SlotId};
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    fn slot(base: u64) -> Memslot {
        Memslot::new(AsId(0), SlotId((base % 65_000) as u16), Gfn(base), 1, Hva(0), 0)
    }

    /// Given its room, an insert allocates nothing: it splits into the spare block and grows
    /// no vector (their buffers stay where they were), through the first block and 2000 more
    /// slots inserted in front of the others (a split every few inserts).
    #[test]
    fn an_insert_given_room_uses_the_spare_and_keeps_the_buffers() {
        let mut ix = GfnIndex::default();
        for k in (0..2000u64).rev() {
            let room = ix.room(slot(k)).expect("heap");
            ix.take_room(room);
            assert!(ix.has_room(), "{k}");
            let spare = ix.spare.as_deref().map(|b| b as *const Block).expect("a spare block");
            let (firsts, blocks) = (ix.firsts.as_ptr(), ix.blocks.as_ptr());
            let nblocks = ix.blocks.len();
            assert!(ix.insert(slot(k)).is_none());
            assert_eq!((ix.firsts.as_ptr(), ix.blocks.as_ptr()), (firsts, blocks), "{k}");
            if ix.blocks.len() > nblocks {
                assert!(ix.blocks.iter().any(|b| core::ptr::eq(&**b, spare)), "{k}: new block");
            }
        }
        ix.check();
        for k in 0..1990u64 {
            ix.remove(k);
        }
        ix.check();
        assert!(ix.spare.is_some(), "a block the removals freed is kept");
    }

    /// A block a merge frees keeps its entries (48 here, more than the 32 a split moves into
    /// it) until a split reuses it as the new right block: its stale keys, padding and `sums`
    /// must not show through. Slots created in address order (blocks of 48, 48, 32), 33 removed
    /// from the first block (it merges with the second, which becomes the spare), then two
    /// inserted into the merged block (full, it splits into the spare).
    #[test]
    fn a_split_into_a_block_a_merge_freed_shows_none_of_its_old_keys() {
        let mut ix = GfnIndex::default();
        let mut model = BTreeMap::new();
        for k in (0..128u64).map(|i| 2 * i) {
            ix.insert(slot(k));
            model.insert(k, slot(k));
        }
        assert_eq!(ix.blocks.iter().map(|b| b.len).collect::<Vec<_>>(), [48, 48, 32]);
        for k in (0..33u64).map(|i| 2 * i) {
            assert_eq!(ix.remove(k), model.remove(&k));
        }
        assert_eq!(ix.spare.as_ref().map(|b| b.len), Some(48), "the merged-away block");
        for k in [101, 103] {
            assert!(ix.insert(slot(k)).is_none());
            model.insert(k, slot(k));
        }
        assert!(ix.spare.is_none(), "the split took the spare");
        let probes: Vec<u64> = (0..300).collect();
        agrees(&ix, &model, &probes);
    }

    /// Compares every query with a `BTreeMap` model.
    fn agrees(ix: &GfnIndex, model: &BTreeMap<u64, Memslot>, probes: &[u64]) {
        ix.check();
        assert_eq!(ix.len(), model.len());
        assert!(ix.iter().eq(model.values()));
        // u64::MAX equals the padding of unused keys.
        for &g in probes.iter().chain(&[u64::MAX - 1, u64::MAX]) {
            assert_eq!(ix.last_at_or_below(g), model.range(..=g).next_back().map(|(_, s)| s));
            assert_eq!(ix.get(g), model.get(&g));
            let from = model.range(..=g).next_back().map_or(0, |(k, _)| *k);
            let want: Vec<_> = model.range(from..).map(|(_, s)| s).collect();
            assert!(ix.iter_from(g).eq(want.iter().copied()), "iter_from({g})");
            assert!(ix.iter_from_edit(g).eq(want), "iter_from_edit({g})");
        }
    }

    #[test]
    fn grows_and_shrinks_through_splits_and_merges() {
        let mut ix = GfnIndex::default();
        let mut model = BTreeMap::new();
        // Ascending, descending and interleaved inserts, 2000 slots.
        for k in (0..2000u64).map(|i| if i % 2 == 0 { i * 3 } else { 6000 - i * 3 }) {
            assert_eq!(ix.insert(slot(k)), model.insert(k, slot(k)));
        }
        agrees(&ix, &model, &[0, 1, 2, 3, 2999, 3000, 5999, 6000, 6001, u64::MAX]);
        // Removing from the front, the back and the middle, down to nothing.
        let keys: Vec<u64> = model.keys().copied().collect();
        for (n, k) in keys.iter().rev().step_by(2).chain(keys.iter().step_by(2)).enumerate() {
            assert_eq!(ix.remove(*k), model.remove(k), "remove {k}");
            if n % 97 == 0 {
                agrees(&ix, &model, &[0, *k, k.saturating_sub(1), k + 1]);
            }
        }
        agrees(&ix, &model, &[0, 5, u64::MAX]);
        assert!(ix.blocks.is_empty() && ix.firsts.is_empty());
        assert_eq!(ix.remove(3), None);
    }

    #[test]
    fn slots_created_in_address_order_fill_blocks_to_three_quarters() {
        for keys in [(0..3000u64).collect::<Vec<_>>(), (0..3000u64).rev().collect()] {
            let mut ix = GfnIndex::default();
            for k in keys {
                ix.insert(slot(k));
            }
            ix.check();
            assert!(ix.blocks.len() <= 3000 / (CAP - MIN) + 1, "{} blocks", ix.blocks.len());
        }
    }

    #[test]
    fn insert_replaces_the_slot_at_the_same_base() {
        let mut ix = GfnIndex::default();
        ix.insert(slot(10));
        let other = Memslot::new(AsId(0), SlotId(7), Gfn(10), 4, Hva(0), 0);
        assert_eq!(ix.insert(other), Some(slot(10)));
        assert_eq!(ix.get(10), Some(&other));
        assert_eq!(ix.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        /// Move the slot at the first key to the second (nearby, so most keep their place).
        Rebase(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // A small key space, so removes hit and blocks split and merge often.
        prop_oneof![
            (0u64..400).prop_map(Op::Insert),
            (0u64..400).prop_map(Op::Remove),
            (0u64..400, 0u64..8).prop_map(|(k, d)| Op::Rebase(k, (k + d).saturating_sub(3))),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_a_btreemap(ops in proptest::collection::vec(op(), 1..600)) {
            let mut ix = GfnIndex::default();
            // The same edits with the finger dropped before each: the finger must not change
            // the index's shape (both sets of a memslot pair must stay alike).
            let mut plain = GfnIndex::default();
            let mut model = BTreeMap::new();
            for (n, o) in ops.iter().enumerate() {
                plain.finger = None;
                match *o {
                    Op::Insert(k) => {
                        prop_assert_eq!(plain.insert(slot(k)), model.get(&k).copied());
                        prop_assert_eq!(ix.insert(slot(k)), model.insert(k, slot(k)));
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(plain.remove(k), model.get(&k).copied());
                        prop_assert_eq!(ix.remove(k), model.remove(&k));
                    }
                    // Onto another slot's base is outside the contract (an overlap).
                    Op::Rebase(k, to) if to != k && model.contains_key(&to) => {}
                    Op::Rebase(k, to) => {
                        let expected = model.remove(&k);
                        if expected.is_some() {
                            model.insert(to, slot(to));
                        }
                        prop_assert_eq!(plain.rebase(k, slot(to)), expected);
                        prop_assert_eq!(ix.rebase(k, slot(to)), expected);
                    }
                }
                ix.check();
                let shape = |x: &GfnIndex| -> Vec<Vec<u64>> {
                    x.blocks.iter().map(|b| b.keys().to_vec()).collect()
                };
                prop_assert_eq!(shape(&ix), shape(&plain));
                if n % 50 == 0 {
                    agrees(&ix, &model, &[0, 1, 199, 200, 399, 400]);
                }
            }
            let probes: Vec<u64> = (0..402).collect();
            agrees(&ix, &model, &probes);
        }
    }
}
