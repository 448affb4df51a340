//! The entries of one table that meet a gfn range: where every range operation of the TDP MMU
//! (zapping, write protection for dirty logging, huge-page recovery) starts its loop.
//!
//! Invariant: entry `i` of a table at `level` whose first gfn is `base` covers
//! `[base + i * level.pages(), base + (i + 1) * level.pages())`; the iterator yields, in index
//! order, exactly the entries whose block meets `[start, end)`.

use crate::host::TableEntries;
use crate::sync::AtomicU64;
use crate::types::{Gfn, Level};

/// One entry of a table and the gfn block it covers.
pub(super) struct EntryInRange<'t> {
    /// The entry.
    pub entry: &'t AtomicU64,
    /// The first gfn of its block.
    pub lo: Gfn,
    /// The gfn after its block.
    pub hi: Gfn,
}

impl EntryInRange<'_> {
    /// Whether the whole block lies in `[start, end)`.
    pub fn inside(&self, start: Gfn, end: Gfn) -> bool {
        self.lo >= start && self.hi <= end
    }
}

/// The entries of `table` (at `level`, covering gfns from `base`) whose block meets
/// `[start, end)`, in index order.
pub(super) fn entries_meeting(
    table: &TableEntries,
    level: Level,
    base: Gfn,
    start: Gfn,
    end: Gfn,
) -> impl Iterator<Item = EntryInRange<'_>> {
    let span = level.pages();
    let first = start.raw().saturating_sub(base.raw()) / span;
    table
        .iter()
        .enumerate()
        .skip(usize::try_from(first).unwrap_or(usize::MAX))
        .map(move |(i, entry)| {
            let lo = base.raw() + i as u64 * span;
            EntryInRange { entry, lo: Gfn(lo), hi: Gfn(lo + span) }
        })
        .take_while(move |e| e.lo < end)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn table() -> alloc::boxed::Box<TableEntries> {
        alloc::boxed::Box::new(core::array::from_fn(|i| AtomicU64::new(i as u64)))
    }

    /// The indices and blocks yielded for one range.
    fn yielded(level: Level, base: u64, start: u64, end: u64) -> alloc::vec::Vec<(u64, u64, u64)> {
        let t = table();
        entries_meeting(&t, level, Gfn(base), Gfn(start), Gfn(end))
            .map(|e| (e.entry.load(crate::sync::Ordering::Relaxed), e.lo.raw(), e.hi.raw()))
            .collect()
    }

    #[test]
    fn yields_exactly_the_entries_meeting_the_range() {
        // A 2 MiB-level table from gfn 0x40000: entries of 512 pages.
        let base = 0x40000;
        assert_eq!(yielded(Level::L2M, base, base, base + 1), [(0, base, base + 512)]);
        assert_eq!(
            yielded(Level::L2M, base, base + 511, base + 513),
            [(0, base, base + 512), (1, base + 512, base + 1024)]
        );
        assert_eq!(yielded(Level::L2M, base, base + 1024, base + 1024), []);
        // A range that starts before the table and ends after it: every entry.
        assert_eq!(yielded(Level::L4K, 512, 0, 1 << 20).len(), 512);
        // Entirely before or after the table: none.
        assert_eq!(yielded(Level::L4K, 512, 0, 512), []);
        assert_eq!(yielded(Level::L4K, 512, 1024, 2048), []);
        // The last entry of the table.
        assert_eq!(yielded(Level::L4K, 512, 1023, 1024), [(511, 1023, 1024)]);
    }

    #[test]
    fn inside_means_the_whole_block() {
        let t = table();
        let e: alloc::vec::Vec<_> =
            entries_meeting(&t, Level::L2M, Gfn(0), Gfn(256), Gfn(1535)).collect();
        assert_eq!(e.len(), 3);
        let inside: alloc::vec::Vec<bool> =
            e.iter().map(|e| e.inside(Gfn(256), Gfn(1535))).collect();
        assert_eq!(inside, [false, true, false]);
    }
}
