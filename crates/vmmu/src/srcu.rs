//! SRCU-like grace periods: readers mark read sections in their own record, wait-free; an updater
//! calls [`Srcu::synchronize`] to wait until every read section that began before the call has
//! ended. Mirrors the part of Linux's SRCU that KVM uses for `kvm->srcu` (memslots) and that the
//! TDP MMU uses for deferred freeing of page-table pages; it is generic over what it protects.
//!
//! # What this module owns
//! - reader records, `max_readers` of them made at construction, each claimed by one reader (a
//!   vCPU) from `register` to `unregister` and then free for the next;
//! - a global grace-period counter.
//!
//! A record is one `AtomicU64`: bits 0..16 count the reader's nested open sections, bits 16..64
//! hold the low 48 bits of the counter as read when the outermost section began (the
//! *snapshot*). `0` means "not reading".
//!
//! # Protocol
//! Reader, entering: `c = counter.load(Acquire)`; then one compare-exchange on its own record,
//! `AcqRel`, from idle to `(c << 16) | 1` (or, nested, from `n` to `n + 1`, keeping the older
//! snapshot). Then it loads whatever the updater publishes. Leaving: a `Release` RMW that lowers
//! the count (to `0` when the outermost section ends).
//!
//! Updater ([`Srcu::synchronize`]), after publishing with a `Release` store: `t = counter.fetch_add(1,
//! AcqRel) + 1`; then for every record, repeatedly `fetch_add(0, AcqRel)` (an RMW that reads and
//! writes back the same value) until the record shows no open section whose snapshot is
//! before `t`.
//!
//! # Memory-ordering argument (C11 acquire/release only; no SeqCst Dekker pattern)
//! All RMWs on one record are totally ordered (its modification order). Take a reader section R
//! and one `synchronize` S, and look at R's entering RMW `E` and S's reading RMW `U` on R's record.
//! 1. `U` before `E` in the record's order. `E` is an RMW, so it reads the value written by `U`
//!    or by a later RMW in `U`'s release sequence; `E` is `Acquire`, `U` is `Release`, so `U`
//!    synchronizes with `E`. The updater's publication (sequenced before `U`) happens before every
//!    load R makes after `E`: **R sees the new data.**
//! 2. `E` before `U`. Then `U` reads `E`'s value or a later one. If the record still shows R's
//!    section with a snapshot before `t`, S waits; it stops only after an RMW of S reads a value
//!    written by R's leaving RMW (a `Release`) or by a later RMW of its release sequence, so R's
//!    section happens before everything S does afterwards: **S waited for R.** If instead the
//!    snapshot is `t` or later, R's counter load read S's bump (or a later one), which is a
//!    `Release` RMW sequenced after the publication, so the load synchronizes with it and R sees
//!    the new data, as in case 1.
//!
//! So every reader either sees what the updater published before `synchronize`, or is waited
//! for. The loom models in `tests/loom_srcu.rs` check both directions with the real code.
//!
//! # Progress
//! Readers never wait: with one thread per [`ReaderId`] (the intended use, one per vCPU) the
//! record is written by that thread only (the updater's `fetch_add(0)` writes back the value it
//! read), so each compare-exchange succeeds at the first try. Sharing a `ReaderId` between threads
//! is still memory-safe (the record counts every open section) but then only lock-free, and the
//! updater may wait longer (a joiner keeps the older snapshot). `synchronize` must not be called
//! from inside a read section of the same `Srcu` (it would wait for itself; KVM has the same rule
//! for `slots_lock` and `kvm->srcu`).

use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering, Relax};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Bits of a record holding the nesting count.
const NEST_BITS: u32 = 16;
/// Mask of the nesting count in a record.
const NEST_MASK: u64 = (1 << NEST_BITS) - 1;
/// Mask of the counter snapshot (48 bits; it wraps after 2^48 grace periods, and the comparison
/// below is modular).
const SNAP_MASK: u64 = u64::MAX >> NEST_BITS;
/// Half the snapshot space: a snapshot at most this far behind the target began before it.
const SNAP_HALF: u64 = 1 << (63 - NEST_BITS);

/// Why a reader could not be registered.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum SrcuError {
    /// All reader records are taken.
    #[error("all {max} SRCU reader records are taken; raise max_readers (one record per vCPU)")]
    TooManyReaders {
        /// The number of records.
        max: usize,
    },
}

/// A registered reader: the index of its record. Obtained from [`Srcu::register`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ReaderId(u32);

impl ReaderId {
    /// The record index.
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// One reader's record, on its own cache line so readers do not share lines with each other.
#[repr(align(64))]
struct Record {
    state: AtomicU64,
    /// Claimed by a reader ([`Srcu::register`] .. [`Srcu::unregister`]).
    owned: AtomicBool,
}

/// The grace-period domain: reader records and the global counter.
pub struct Srcu {
    counter: AtomicU64,
    records: Box<[Record]>,
    /// Records claimed now (for `Debug`).
    registered: AtomicUsize,
}

impl core::fmt::Debug for Srcu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Srcu")
            .field("max_readers", &self.records.len())
            .field("registered", &self.registered.load(Ordering::Relaxed))
            .finish()
    }
}

/// An open read section. Dropping it ends the section.
#[must_use = "the read section ends when the guard is dropped"]
pub struct ReadGuard<'a> {
    srcu: &'a Srcu,
    index: usize,
}

impl Srcu {
    /// A domain with room for `max_readers` readers.
    pub fn new(max_readers: usize) -> Self {
        let records: Vec<Record> = (0..max_readers)
            .map(|_| Record { state: AtomicU64::new(0), owned: AtomicBool::new(false) })
            .collect();
        Srcu {
            counter: AtomicU64::new(0),
            records: records.into_boxed_slice(),
            registered: AtomicUsize::new(0),
        }
    }

    /// The number of reader records.
    pub fn max_readers(&self) -> usize {
        self.records.len()
    }

    /// Claims a free reader record (one per vCPU); [`Self::unregister`] gives it back.
    pub fn register(&self) -> Result<ReaderId, SrcuError> {
        let max = self.records.len();
        for (i, rec) in self.records.iter().enumerate().take(u32::MAX as usize) {
            // Acquire pairs with `unregister`'s Release: the previous owner's last section has
            // ended (its record state is 0) before the new owner opens one.
            if rec.owned.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                self.registered.fetch_add(1, Ordering::Relaxed);
                return Ok(ReaderId(i as u32));
            }
        }
        Err(SrcuError::TooManyReaders { max })
    }

    /// Gives back a reader record (a vCPU is destroyed), for a later [`Self::register`]. The
    /// reader must have no section open; `id` must not be used afterwards. (Misuse cannot break
    /// memory safety: a record used by two readers only makes grace periods wait longer.)
    pub fn unregister(&self, id: ReaderId) {
        let rec = self.record(id);
        debug_assert_eq!(rec.state.load(Ordering::Relaxed) & NEST_MASK, 0, "section still open");
        if rec.owned.swap(false, Ordering::Release) {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn record(&self, id: ReaderId) -> &Record {
        match self.records.get(id.index()) {
            Some(r) => r,
            None => panic!("ReaderId {} does not belong to this Srcu", id.0),
        }
    }

    /// Opens a read section for reader `id`. Wait-free when each `ReaderId` is used by one
    /// thread at a time. Sections nest (up to 65535 deep).
    ///
    /// # Panics
    /// If `id` was not registered with this `Srcu` (its index is out of range), or on nesting
    /// overflow.
    #[inline]
    pub fn read_lock(&self, id: ReaderId) -> ReadGuard<'_> {
        let rec = &self.record(id).state;
        // Relaxed: only a first guess for the compare-exchange, which does the ordering.
        let mut cur = rec.load(Ordering::Relaxed);
        loop {
            let new = if cur & NEST_MASK == 0 {
                // Acquire: if this reads an updater's bump, the updater's publication (before
                // the bump) is visible to this section (module doc, case 2).
                let snap = self.counter.load(Ordering::Acquire) & SNAP_MASK;
                (snap << NEST_BITS) | 1
            } else {
                assert!(cur & NEST_MASK != NEST_MASK, "SRCU read sections nested too deep");
                cur + 1
            };
            // AcqRel: Acquire pairs with the updater's Release RMW on this record (case 1);
            // Release makes the section visible in the record's modification order.
            match rec.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        ReadGuard { srcu: self, index: id.index() }
    }

    /// Opens a read section with no guard, for callers whose section spans calls that cannot
    /// hold a borrow (a vCPU's guest-mode period). Close it with [`Self::read_unlock_raw`].
    #[inline]
    pub fn read_lock_raw(&self, id: ReaderId) {
        core::mem::forget(self.read_lock(id));
    }

    /// Closes a section opened by [`Self::read_lock_raw`].
    ///
    /// # Safety
    /// A section opened with `read_lock_raw(id)` on this `Srcu` is open and not yet closed, and
    /// the caller owns it (no guard of that section exists).
    #[inline]
    pub unsafe fn read_unlock_raw(&self, id: ReaderId) {
        drop(ReadGuard { srcu: self, index: id.index() });
    }

    /// Waits until every read section that began before this call has ended, using `relax`
    /// between polls. Must not be called from inside a read section of this `Srcu`.
    pub fn synchronize(&self, relax: &impl Relax) {
        self.synchronize_nudging(relax, || {});
    }

    /// [`Self::synchronize`], calling `nudge` once when the grace period has begun (after the
    /// counter bump, before waiting for any reader): a section that opens after the nudge is not
    /// waited for. Readers whose sections last until something wakes them (a vCPU in guest mode
    /// holds one until its next exit) are woken by `nudge`; woken before the bump instead, such a
    /// reader could leave and re-enter with a section that still counts as older than the grace
    /// period, and be waited for forever.
    pub fn synchronize_nudging(&self, relax: &impl Relax, nudge: impl FnOnce()) {
        // AcqRel: Release so a reader whose snapshot reads this bump sees what was published
        // before it; Acquire keeps the record polls below after the bump.
        let target = self.counter.fetch_add(1, Ordering::AcqRel).wrapping_add(1) & SNAP_MASK;
        nudge();
        for rec in self.records.iter() {
            loop {
                // An RMW, not a load: it is ordered with the readers' RMWs on this record, and
                // its Release half heads a release sequence that new readers acquire (case 1);
                // its Acquire half pairs with a reader's leaving Release (case 2).
                let v = rec.state.fetch_add(0, Ordering::AcqRel);
                if !began_before(v, target) {
                    break;
                }
                relax.relax();
            }
        }
    }

    /// [`Self::synchronize`] with the default wait policy.
    pub fn synchronize_default(&self) {
        self.synchronize(&crate::sync::DefaultRelax::default());
    }
}

/// Whether record value `v` shows an open section that began before grace period `target`.
#[inline]
fn began_before(v: u64, target: u64) -> bool {
    if v & NEST_MASK == 0 {
        return false;
    }
    let snap = v >> NEST_BITS;
    let behind = target.wrapping_sub(snap) & SNAP_MASK;
    behind != 0 && behind < SNAP_HALF
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let rec = &self.srcu.records[self.index].state;
        let mut cur = rec.load(Ordering::Relaxed);
        loop {
            debug_assert!(cur & NEST_MASK != 0, "SRCU record shows no open section");
            let new = if cur & NEST_MASK == 1 { 0 } else { cur - 1 };
            // Release: the section's reads happen before an updater that reads this value
            // (or a later RMW of its release sequence) with Acquire (case 2).
            match rec.compare_exchange(cur, new, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn register_is_bounded() {
        let s = Srcu::new(2);
        assert_eq!(s.register().unwrap().index(), 0);
        assert_eq!(s.register().unwrap().index(), 1);
        assert_eq!(s.register(), Err(SrcuError::TooManyReaders { max: 2 }));
    }

    #[test]
    fn records_count_nested_sections() {
        let s = Srcu::new(1);
        let id = s.register().unwrap();
        let a = s.read_lock(id);
        let b = s.read_lock(id);
        let v = s.records[0].state.load(Ordering::Relaxed);
        assert_eq!(v & NEST_MASK, 2);
        drop(b);
        assert_eq!(s.records[0].state.load(Ordering::Relaxed) & NEST_MASK, 1);
        drop(a);
        assert_eq!(s.records[0].state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn synchronize_without_readers_returns() {
        let s = Srcu::new(4);
        s.synchronize_default();
        let id = s.register().unwrap();
        drop(s.read_lock(id));
        s.synchronize_default();
        assert_eq!(s.counter.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn began_before_is_modular() {
        let active = |snap: u64| (snap << NEST_BITS) | 1;
        assert!(began_before(active(4), 5));
        assert!(!began_before(active(5), 5));
        assert!(!began_before(active(6), 5), "a later snapshot began after");
        assert!(!began_before(4 << NEST_BITS, 5), "an idle record never blocks");
        assert!(began_before(active(SNAP_MASK), 0), "wrapped counter");
    }

    #[test]
    #[should_panic(expected = "does not belong")]
    fn foreign_reader_id_panics() {
        let a = Srcu::new(4);
        let b = Srcu::new(1);
        let _ = a.register().unwrap();
        let id = a.register().unwrap();
        let _g = b.read_lock(id);
    }

    #[cfg(feature = "std")]
    #[test]
    fn synchronize_waits_for_an_older_reader() {
        use crate::sync::{Arc, AtomicBool};
        let s = Arc::new(Srcu::new(1));
        let id = s.register().unwrap();
        let g = s.read_lock(id);
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                s.synchronize_default();
                done.store(true, Ordering::Release);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::Acquire), "synchronize returned while an older reader reads");
        drop(g);
        t.join().unwrap();
        assert!(done.load(Ordering::Acquire));
    }

    #[cfg(feature = "std")]
    #[test]
    fn synchronize_ignores_a_newer_reader() {
        let s = Srcu::new(1);
        let id = s.register().unwrap();
        // Simulate a section that began after the next bump: snapshot == next target.
        s.records[0].state.store((1 << NEST_BITS) | 1, Ordering::Relaxed);
        s.synchronize_default();
        s.records[0].state.store(0, Ordering::Relaxed);
        let _ = id;
    }
}
