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
//! A record has one writer, its reader (a [`ReaderId`] is neither `Clone` nor `Sync`, so one
//! thread at a time holds and uses it), and the updater only reads it. So a reader needs no
//! read-modify-write:
//!
//! - Reader, entering the outermost section: `c = counter.load(Acquire)`;
//!   `record.store((c << 16) | 1, Release)`; then the **reader fence**; then it loads whatever the
//!   updater publishes. Nested: `record.store(n + 1, Relaxed)`.
//! - Reader, leaving: `record.store(n - 1, Release)` (`0` for the outermost).
//! - Updater ([`Srcu::synchronize`]), after publishing: the **updater fence**; `t =
//!   counter.fetch_add(1, AcqRel) + 1`; then for every record, `record.load(Acquire)` until it
//!   shows no open section whose snapshot is before `t`.
//!
//! The fences come in two kinds ([`ReaderFences`]): `Full` (both are `fence(SeqCst)`; the only kind
//! under loom) or `Asymmetric`, where the reader fence is a compiler fence and the updater fence is
//! the host's process-wide barrier (Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, as in
//! liburcu's "memb" flavour): it makes every thread of the process run a full barrier, which turns
//! each reader's compiler fence into a `SeqCst` fence wherever the argument below needs one. The
//! reader's hot path is then two plain loads and a plain store to enter, one store to leave.
//!
//! # Memory-ordering argument
//! Take a reader section R (entering store `E`, reader fence `F_r`, then its loads) and one
//! `synchronize` S (publication `P`, updater fence `F_u`, bump `B`, its load `L` of R's record).
//! The fences are `SeqCst`, so they are totally ordered:
//! 1. `F_u` before `F_r`: `P` is sequenced before `F_u` and R's loads after `F_r`, so (C++
//!    [atomics.order], fences) **R sees the new data** (or newer).
//! 2. `F_r` before `F_u`: then `L` (after `F_u`) reads `E` or a later store of the record. A later
//!    store of the same reader (or of the record's next owner, which claimed it after this one
//!    gave it back) is `Release` (a leave, or a newer section's entry), or a nested entry, which
//!    is `Relaxed` but follows its outermost entry's `SeqCst` reader fence (a release fence too);
//!    so `L` (`Acquire`) synchronizes with it and R's section happens before everything S does
//!    next.
//!    If `L` reads `E` itself: if the snapshot is before `t`, S waits until it reads a later store
//!    (same as before: **S waited for R**); if the snapshot is `t` or later, R's counter load read
//!    `B` (an `AcqRel` RMW sequenced after `P`) or a later bump, so **R sees the new data**.
//!    (The fences alone give this too: `B` is coherence-ordered before that counter load, so
//!    C++20 [atomics.order]/4 puts `F_u` before `F_r`, case 1. The counter's `Acquire`/`AcqRel`
//!    are belt and braces; the loom models also pass with them `Relaxed`.)
//!
//! So every reader either sees what the updater published before `synchronize`, or is waited
//! for. The loom models in `tests/loom_srcu.rs` check both directions with the real code (also
//! with two `synchronize` at once, a record given back and claimed again during a grace period,
//! and a reader's next section nesting during one), and `loom_srcu.rs` also shows that without
//! the reader fence a section can be missed.
//!
//! # Progress
//! Readers never wait (no loop, no RMW). `synchronize` must not be called
//! from inside a read section of the same `Srcu` (it would wait for itself; KVM has the same rule
//! for `slots_lock` and `kvm->srcu`).

use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering, Relax};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::marker::PhantomData;

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

/// A registered reader: the right to write one record of one [`Srcu`]. Obtained from
/// [`Srcu::register`], given back with [`Srcu::unregister`]. Neither `Clone` nor `Sync`: a record
/// has exactly one writer at a time, which is what lets readers use plain stores (module doc).
/// It may move to another thread (`Send`) between sections.
#[derive(Debug)]
pub struct ReaderId {
    index: u32,
    domain: u64,
    /// `!Sync` (and `!Send`, given back below): one thread uses a reader at a time.
    _one_thread: PhantomData<*const ()>,
}

// SAFETY: moving a `ReaderId` to another thread moves the right to write its record; the move
// itself (a channel, a spawn) orders the old owner's stores before the new owner's.
unsafe impl Send for ReaderId {}

impl ReaderId {
    /// The record index.
    #[inline]
    pub const fn index(&self) -> usize {
        self.index as usize
    }
}

/// A process-wide memory barrier (Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`), as
/// [`ReaderFences::Asymmetric`] needs it. Made only through the `unsafe` [`Self::new`]: with
/// asymmetric fences the grace period's correctness, on which the MMU's `unsafe` code rests
/// (freeing table pages, editing an unpublished memslot set), depends on the function doing what
/// it promises, so a safe caller cannot hand the core a barrier that does nothing.
///
/// ```compile_fail
/// // A plain `fn()` is not a barrier: the field is private, and `new` is `unsafe`.
/// fn nothing() {}
/// let _ = vmmu::srcu::ReaderFences::Asymmetric(vmmu::srcu::ProcessBarrier(nothing));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ProcessBarrier(fn());

impl ProcessBarrier {
    /// Wraps `barrier` as a process-wide barrier.
    ///
    /// # Safety
    /// Each call of `barrier` must, before it returns, make every thread of the process that may
    /// be inside a read section of an [`Srcu`] that uses it (every thread that runs a vCPU or
    /// otherwise reads memslots or tables) execute a full memory barrier (`SeqCst` fence)
    /// ordered after the call began (Linux `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`,
    /// registered first), and must order the calling thread's own accesses as a full barrier
    /// would: its loads and stores before the call happen before each of those threads' barrier,
    /// and each of those barriers before its loads and stores after the call (membarrier's
    /// guarantee; an implementation that waits for those threads' acknowledgements with Relaxed
    /// loads does not give it). It may panic, but must not return without doing so. A barrier that
    /// does less lets a grace period end while a reader still reads what it protects
    /// (`tests/soundness_audit.rs` shows a no-op doing it), and the MMU then frees or edits
    /// memory under that reader.
    pub const unsafe fn new(barrier: fn()) -> Self {
        ProcessBarrier(barrier)
    }

    /// Runs the barrier.
    #[inline]
    pub fn call(self) {
        (self.0)()
    }
}

/// How a reader's entry is ordered against an updater (module doc, "Protocol").
#[derive(Clone, Copy, Debug, Default)]
// Under loom the hidden model-only variant looks to clippy like a hand-made `#[non_exhaustive]`;
// it is a real variant that only exists there.
#[cfg_attr(loom, allow(clippy::manual_non_exhaustive))]
pub enum ReaderFences {
    /// A `SeqCst` fence on both sides: needs nothing from the host.
    #[default]
    Full,
    /// A compiler fence in readers; the updater calls this process-wide barrier instead (Linux
    /// `membarrier`): it makes every thread that may be reading execute a full memory barrier
    /// before it returns ([`ProcessBarrier::new`]'s contract). Ignored under loom, which cannot
    /// model it (there `Full` is used).
    Asymmetric(ProcessBarrier),
    /// Only for the loom model that shows the reader fence is needed: no reader fence at all.
    #[cfg(loom)]
    #[doc(hidden)]
    NoReaderFenceForModels,
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
    /// This domain's identity: a [`ReaderId`] works only with the `Srcu` that made it.
    domain: u64,
    fences: ReaderFences,
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
    /// The reader's record (its `state`), found once when the section opened.
    rec: &'a AtomicU64,
    /// Borrows the reader, so it cannot be given back or moved while the section is open.
    _id: PhantomData<&'a ReaderId>,
}

impl Srcu {
    /// A domain with room for `max_readers` readers and [`ReaderFences::Full`].
    pub fn new(max_readers: usize) -> Self {
        Self::with_fences(max_readers, ReaderFences::Full)
    }

    /// A domain with room for `max_readers` readers, ordered by `fences`.
    pub fn with_fences(max_readers: usize, fences: ReaderFences) -> Self {
        #[cfg(loom)]
        let fences = match fences {
            ReaderFences::Asymmetric(_) => ReaderFences::Full,
            other => other,
        };
        let records: Vec<Record> = (0..max_readers)
            .map(|_| Record { state: AtomicU64::new(0), owned: AtomicBool::new(false) })
            .collect();
        Srcu {
            counter: AtomicU64::new(0),
            records: records.into_boxed_slice(),
            registered: AtomicUsize::new(0),
            domain: crate::sync::next_domain_id(),
            fences,
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
                return Ok(ReaderId {
                    index: i as u32,
                    domain: self.domain,
                    _one_thread: PhantomData,
                });
            }
        }
        Err(SrcuError::TooManyReaders { max })
    }

    /// Gives back a reader record (a vCPU is destroyed), for a later [`Self::register`], and
    /// retires `id`: using it again panics. A record with a section still open (a raw section
    /// never closed) is kept out of use for good instead: a new owner must start from an idle
    /// record.
    pub fn unregister(&self, id: &mut ReaderId) {
        let rec = self.record(id);
        // No domain is 0: the retired id fails every check from now on.
        id.domain = 0;
        if rec.state.load(Ordering::Relaxed) & NEST_MASK != 0 {
            debug_assert!(false, "SRCU reader given back with a section open");
            return;
        }
        // Release: this owner's last stores come before the next owner's (its Acquire claim).
        if rec.owned.swap(false, Ordering::Release) {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
    }

    #[inline]
    fn record(&self, id: &ReaderId) -> &Record {
        match self.records.get(id.index()) {
            Some(r) if id.domain == self.domain => r,
            _ => foreign_reader(id),
        }
    }

    /// Opens a read section for reader `id`. Wait-free when each `ReaderId` is used by one
    /// thread at a time. Sections nest (up to 65535 deep).
    ///
    /// # Panics
    /// If `id` was not registered with this `Srcu` (another `Srcu` made it, whatever its index),
    /// or on nesting overflow.
    #[inline]
    pub fn read_lock<'a>(&'a self, id: &'a ReaderId) -> ReadGuard<'a> {
        let rec = &self.record(id).state;
        // Relaxed: this thread is the record's only writer.
        let cur = rec.load(Ordering::Relaxed);
        if cur & NEST_MASK == 0 {
            // Acquire: if this reads an updater's bump, the updater's publication (before the
            // bump) is visible to this section (module doc, case 2).
            let snap = self.counter.load(Ordering::Acquire) & SNAP_MASK;
            // Release: a grace period that reads this store (or a later one of this thread)
            // also sees this thread's earlier sections end (case 2).
            rec.store((snap << NEST_BITS) | 1, Ordering::Release);
            self.reader_fence();
        } else {
            assert!(cur & NEST_MASK != NEST_MASK, "SRCU read sections nested too deep");
            // Nested: the outer section's snapshot and fence already cover it.
            rec.store(cur + 1, Ordering::Relaxed);
        }
        ReadGuard { rec, _id: PhantomData }
    }

    /// The reader fence (module doc): `SeqCst`, or a compiler fence when the updater fence is
    /// the host's process-wide barrier.
    #[inline(always)]
    fn reader_fence(&self) {
        match self.fences {
            ReaderFences::Full => crate::sync::fence(Ordering::SeqCst),
            ReaderFences::Asymmetric(_) => crate::sync::compiler_fence(Ordering::SeqCst),
            #[cfg(loom)]
            ReaderFences::NoReaderFenceForModels => {}
        }
    }

    /// The updater fence (module doc).
    fn updater_fence(&self) {
        match self.fences {
            ReaderFences::Full => crate::sync::fence(Ordering::SeqCst),
            ReaderFences::Asymmetric(process_barrier) => process_barrier.call(),
            #[cfg(loom)]
            ReaderFences::NoReaderFenceForModels => crate::sync::fence(Ordering::SeqCst),
        }
    }

    /// Opens a read section with no guard, for callers whose section spans calls that cannot
    /// hold a borrow (a vCPU's guest-mode period). Close it with [`Self::read_unlock_raw`].
    #[inline]
    pub fn read_lock_raw(&self, id: &ReaderId) {
        core::mem::forget(self.read_lock(id));
    }

    /// How many read sections reader `id` has open (nested ones counted). A reader's owner
    /// that knows no section of its own should be open (a [`ReadGuard`] was forgotten, so its
    /// drop never runs) can close them with [`Self::read_unlock_raw`].
    #[inline]
    pub fn open_sections(&self, id: &ReaderId) -> u64 {
        self.record(id).state.load(Ordering::Relaxed) & NEST_MASK
    }

    /// Closes a section opened by [`Self::read_lock_raw`].
    ///
    /// # Safety
    /// A section opened with `read_lock_raw(id)` on this `Srcu` is open and not yet closed, and
    /// the caller owns it (no guard of that section exists).
    #[inline]
    pub unsafe fn read_unlock_raw(&self, id: &ReaderId) {
        drop(ReadGuard { rec: &self.record(id).state, _id: PhantomData });
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
        // Orders the caller's publication before the record loads below, against the readers'
        // entry fences (module doc, the two cases).
        self.updater_fence();
        // AcqRel: Release so a reader whose snapshot reads this bump sees what was published
        // before it; Acquire keeps the record loads below after the bump.
        let target = self.counter.fetch_add(1, Ordering::AcqRel).wrapping_add(1) & SNAP_MASK;
        nudge();
        for rec in self.records.iter() {
            loop {
                // Acquire: pairs with the reader's Release stores (leaving, or entering a newer
                // section), so a section this stops waiting for happens before what follows.
                let v = rec.state.load(Ordering::Acquire);
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
        let rec = self.rec;
        // Relaxed: this thread is the record's only writer.
        let cur = rec.load(Ordering::Relaxed);
        debug_assert!(cur & NEST_MASK != 0, "SRCU record shows no open section");
        let new = if cur & NEST_MASK == 1 { 0 } else { cur - 1 };
        // Release: the section's reads happen before an updater that reads this value with
        // Acquire (case 2).
        rec.store(new, Ordering::Release);
    }
}

/// The panic of [`Srcu::record`], out of the read sections' hot path.
#[cold]
#[inline(never)]
fn foreign_reader(id: &ReaderId) -> ! {
    panic!("ReaderId {} does not belong to this Srcu", id.index)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn register_is_bounded() {
        let s = Srcu::new(2);
        assert_eq!(s.register().unwrap().index(), 0);
        assert_eq!(s.register().unwrap().index(), 1);
        assert_eq!(s.register().unwrap_err(), SrcuError::TooManyReaders { max: 2 });
    }

    #[test]
    fn records_count_nested_sections() {
        let s = Srcu::new(1);
        let id = s.register().unwrap();
        let a = s.read_lock(&id);
        let b = s.read_lock(&id);
        let v = s.records[0].state.load(Ordering::Relaxed);
        assert_eq!(v & NEST_MASK, 2);
        drop(b);
        assert_eq!(s.records[0].state.load(Ordering::Relaxed) & NEST_MASK, 1);
        drop(a);
        assert_eq!(s.records[0].state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_given_back_record_is_reused_and_the_old_id_retired() {
        let s = Srcu::new(1);
        let mut id = s.register().unwrap();
        drop(s.read_lock(&id));
        s.unregister(&mut id);
        let again = s.register().unwrap();
        assert_eq!(again.index(), 0, "the record is free again");
        let retired = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(s.read_lock(&id));
        }));
        assert!(retired.is_err(), "a retired id cannot open sections");
    }

    #[test]
    fn asymmetric_fences_call_the_process_barrier() {
        use core::sync::atomic::{AtomicU32, Ordering as O};
        static CALLS: AtomicU32 = AtomicU32::new(0);
        fn barrier() {
            CALLS.fetch_add(1, O::Relaxed);
        }
        // SAFETY: not a real barrier, but the test has no reader in a section while it runs.
        let s =
            Srcu::with_fences(1, ReaderFences::Asymmetric(unsafe { ProcessBarrier::new(barrier) }));
        let id = s.register().unwrap();
        drop(s.read_lock(&id));
        s.synchronize_default();
        assert_eq!(CALLS.load(O::Relaxed), 1);
    }

    #[test]
    fn synchronize_without_readers_returns() {
        let s = Srcu::new(4);
        s.synchronize_default();
        let id = s.register().unwrap();
        drop(s.read_lock(&id));
        s.synchronize_default();
        assert_eq!(s.counter.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn began_before_is_modular() {
        let active = |snap: u64| (snap << NEST_BITS) | 1;
        assert!(began_before(active(4), 5));
        assert!(began_before(active(3), 5), "two behind: another synchronize bumped meanwhile");
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
        let _g = b.read_lock(&id);
    }

    #[cfg(feature = "std")]
    #[test]
    fn synchronize_waits_for_an_older_reader() {
        use crate::sync::{Arc, AtomicBool};
        let s = Arc::new(Srcu::new(1));
        let id = s.register().unwrap();
        let g = s.read_lock(&id);
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
