//! The pages a scenario's guest wrote since each logged slot's last collection, which every
//! `dirty-log` must report (`scenarios.md`: the pages "the guest wrote since logging started or
//! since they were last cleared", under any MMU). The software machine checks its MMU's answer
//! against them, so a lost dirty page is a failure of the configuration that lost it, never
//! hidden by `vmmu diff`'s allowance for the read faults that dirty pages under TDP only.
//!
//! Invariants: a page is here only if a guest store reached RAM through that slot (address
//! space 0, logging on, not read-only) after the slot's last accepted request and after the
//! last collection or clear that covered it; so the MMU must report at least these (it may
//! report more: a read fault that maps a written host page writable dirties it, as KVM does).

use std::collections::{BTreeMap, BTreeSet};

/// Written pages by slot id (address space 0), as page indexes within the slot.
#[derive(Debug, Default)]
pub(crate) struct WrittenPages {
    by_slot: BTreeMap<u16, BTreeSet<u64>>,
}

impl WrittenPages {
    /// A guest store reached page `page` of logged slot `id`.
    pub(crate) fn wrote(&mut self, id: u16, page: u64) {
        self.by_slot.entry(id).or_default().insert(page);
    }

    /// An accepted request for slot `id` (create, delete, move, flags): forgets its pages (a new
    /// or re-flagged slot starts a new log; a move may keep KVM's bitmap, so forgetting only
    /// asks for less).
    pub(crate) fn slot_changed(&mut self, id: u16) {
        self.by_slot.remove(&id);
    }

    /// A `dirty-log` of slot `id` reported `reported` (ascending). Returns the written pages it
    /// left out, in order; when `clears` (automatic mode, where the call clears what it
    /// returns) the slot's pages are forgotten afterwards.
    pub(crate) fn collected(&mut self, id: u16, reported: &[u64], clears: bool) -> Vec<u64> {
        let missing = self
            .by_slot
            .get(&id)
            .map(|w| w.iter().copied().filter(|p| reported.binary_search(p).is_err()).collect())
            .unwrap_or_default();
        if clears {
            self.by_slot.remove(&id);
        }
        missing
    }

    /// A `clear-dirty-log` of pages `[first, first + count)` of slot `id` succeeded.
    pub(crate) fn cleared(&mut self, id: u16, first: u64, count: u64) {
        if let Some(w) = self.by_slot.get_mut(&id) {
            let end = first.saturating_add(count);
            w.retain(|&p| p < first || p >= end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collection_must_report_every_page_written_since_the_last() {
        let mut w = WrittenPages::default();
        w.wrote(1, 3);
        w.wrote(1, 7);
        assert_eq!(w.collected(1, &[0, 3], true), vec![7]);
        assert_eq!(w.collected(1, &[], true), Vec::<u64>::new(), "auto mode cleared them");
        w.wrote(1, 5);
        assert!(w.collected(1, &[5, 9], false).is_empty(), "more is allowed");
        assert_eq!(w.collected(1, &[], false), vec![5], "manual mode clears nothing");
        w.cleared(1, 0, 64);
        assert!(w.collected(1, &[], false).is_empty());
        w.wrote(2, 1);
        w.slot_changed(2);
        assert!(w.collected(2, &[], true).is_empty());
    }
}
