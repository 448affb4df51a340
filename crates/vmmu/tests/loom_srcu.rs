//! loom models of `vmmu::srcu`: the two directions of the grace-period guarantee, with the real
//! code through the sync shim. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p vmmu --release --test loom_srcu`.
//!
//! The protected data is a double buffer of loom `UnsafeCell`s, so loom itself reports a reader
//! whose access to the old buffer is not ordered before the updater's reuse of it.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use vmmu::srcu::{ReaderFences, Srcu};
use vmmu::sync::Yield;

/// Shared state: the SRCU domain, two buffers and the index of the published one.
struct Shared {
    srcu: Srcu,
    bufs: [UnsafeCell<u64>; 2],
    active: AtomicUsize,
}

impl Shared {
    fn new(readers: usize) -> Arc<Self> {
        Self::with_fences(readers, ReaderFences::Full)
    }

    fn with_fences(readers: usize, fences: ReaderFences) -> Arc<Self> {
        Arc::new(Shared {
            srcu: Srcu::with_fences(readers, fences),
            bufs: [UnsafeCell::new(1), UnsafeCell::new(0)],
            active: AtomicUsize::new(0),
        })
    }

    /// Publish buffer 1 with value 2, wait for a grace period, then reuse buffer 0 (value 99,
    /// "freed").
    fn update(&self) {
        // SAFETY: buffer 1 is not published yet (`active` is 0), so no reader reads it; loom's
        // cell checks that.
        self.bufs[1].with_mut(|p| unsafe { *p = 2 });
        self.active.store(1, Ordering::Release);
        self.srcu.synchronize(&Yield);
        // SAFETY: the grace period above waited for every reader that could read buffer 0; that
        // is the property under test, and loom's cell reports an access not ordered before this.
        self.bufs[0].with_mut(|p| unsafe { *p = 99 });
    }
}

/// A reader whose section began before the publication is waited for: it never sees the reused
/// buffer, and loom finds no unordered access to buffer 0.
#[test]
fn older_reader_is_waited_for() {
    older_reader(ReaderFences::Full);
}

/// The model has teeth: without the reader's fence (plain stores only), loom finds a reader that
/// read the old buffer after the updater's grace period ended (a use after reuse), which is why
/// readers need a `SeqCst` fence, or the host's process-wide barrier on the updater side.
#[test]
fn older_reader_without_the_reader_fence_is_missed() {
    let r = std::panic::catch_unwind(|| older_reader(ReaderFences::NoReaderFenceForModels));
    let msg = match r {
        Ok(()) => panic!("loom found no interleaving where the unfenced reader is missed"),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    // The reader's read of the old buffer races the updater's reuse of it.
    assert!(
        msg.contains("Causality violation") || msg.contains("reader saw"),
        "unexpected failure: {msg}"
    );
}

fn older_reader(fences: ReaderFences) {
    loom::model(move || {
        let s = Shared::with_fences(1, fences);
        let id = s.srcu.register().unwrap();
        let r = {
            let s = s.clone();
            thread::spawn(move || {
                let g = s.srcu.read_lock(&id);
                let i = s.active.load(Ordering::Acquire);
                // SAFETY: a read inside a read section: the grace period orders it before its
                // buffer's reuse (what the model checks; loom's cell reports an unordered access).
                let v1 = s.bufs[i].with(|p| unsafe { *p });
                thread::yield_now();
                // SAFETY: a read inside a read section: the grace period orders it before its
                // buffer's reuse (what the model checks; loom's cell reports an unordered access).
                let v2 = s.bufs[i].with(|p| unsafe { *p });
                drop(g);
                assert!(v1 == v2 && (v1 == 1 || v1 == 2), "reader saw {v1} then {v2}");
            })
        };
        s.update();
        r.join().unwrap();
    });
}

/// A reader that starts after `synchronize` returned (learned through a Relaxed flag, so loom
/// gives no other ordering) sees the published buffer.
#[test]
fn later_reader_sees_the_publication() {
    loom::model(|| {
        let s = Shared::new(1);
        let done = Arc::new(AtomicBool::new(false));
        let id = s.srcu.register().unwrap();
        let r = {
            let (s, done) = (s.clone(), done.clone());
            thread::spawn(move || {
                if done.load(Ordering::Relaxed) {
                    let _g = s.srcu.read_lock(&id);
                    assert_eq!(
                        s.active.load(Ordering::Acquire),
                        1,
                        "stale index after the grace period"
                    );
                    // SAFETY: a read inside a read section: the grace period orders it before
                    // its buffer's reuse (what the model checks; loom's cell reports an unordered
                    // access).
                    assert_eq!(s.bufs[1].with(|p| unsafe { *p }), 2);
                }
            })
        };
        s.update();
        done.store(true, Ordering::Relaxed);
        r.join().unwrap();
    });
}

/// Two readers, one nesting its sections: both directions hold together.
#[test]
fn two_readers_with_nesting() {
    loom::model(|| {
        let s = Shared::new(2);
        let ids = [s.srcu.register().unwrap(), s.srcu.register().unwrap()];
        let readers: Vec<_> = ids
            .into_iter()
            .enumerate()
            .map(|(n, id)| {
                let s = s.clone();
                thread::spawn(move || {
                    let outer = s.srcu.read_lock(&id);
                    let i = s.active.load(Ordering::Acquire);
                    if n == 1 {
                        let inner = s.srcu.read_lock(&id);
                        drop(inner);
                    }
                    // SAFETY: a read inside a read section: the grace period orders it before
                    // its buffer's reuse (what the model checks; loom's cell reports an unordered
                    // access).
                    let v = s.bufs[i].with(|p| unsafe { *p });
                    drop(outer);
                    assert!(v == 1 || v == 2, "reader {n} saw {v}");
                })
            })
            .collect();
        s.update();
        for r in readers {
            r.join().unwrap();
        }
    });
}

/// Two grace periods at once (as two threads reclaiming table pages at once: `reclaim` is not
/// serialised): each updater swaps its own cell in, waits, and reuses the cell its swap took out.
/// The reader's section may begin before both bumps, so the later updater sees it with a
/// snapshot two behind its target; it must wait for it all the same. Kills the mutation of
/// `began_before` to "exactly one behind" (`behind == 1`), which the single-updater models and
/// the unit tests (all one behind) let through.
#[test]
fn two_synchronizers_at_once() {
    loom::model(|| {
        let s = Arc::new(Triple {
            srcu: Srcu::new(1),
            cells: [UnsafeCell::new(1), UnsafeCell::new(0), UnsafeCell::new(0)],
            active: AtomicUsize::new(0),
        });
        let id = s.srcu.register().unwrap();
        let r = {
            let s = s.clone();
            thread::spawn(move || {
                let g = s.srcu.read_lock(&id);
                let i = s.active.load(Ordering::Acquire);
                // SAFETY: a read inside a read section: the grace period of the updater that
                // takes cell `i` out orders it before the cell's reuse (what the model checks).
                let v = s.cells[i].with(|p| unsafe { *p });
                drop(g);
                assert!(v == i as u64 + 1, "reader saw {v} in cell {i}");
            })
        };
        let u = {
            let s = s.clone();
            thread::spawn(move || s.update(2))
        };
        s.update(1);
        u.join().unwrap();
        r.join().unwrap();
    });
}

/// Three cells for two updaters: cell 0 is published first, updater `k` publishes cell `k`.
struct Triple {
    srcu: Srcu,
    cells: [UnsafeCell<u64>; 3],
    active: AtomicUsize,
}

impl Triple {
    /// Fill cell `k` (value `k + 1`), swap it in, wait for a grace period, reuse what the swap
    /// took out (value 99).
    fn update(&self, k: usize) {
        // SAFETY: cell `k` is not published yet (only this updater publishes it); loom's cell
        // checks that.
        self.cells[k].with_mut(|p| unsafe { *p = k as u64 + 1 });
        let old = self.active.swap(k, Ordering::AcqRel);
        self.srcu.synchronize(&Yield);
        // SAFETY: `old` was unpublished by this swap alone, and the grace period above waited
        // for every reader that could have loaded it: the property under test.
        self.cells[old].with_mut(|p| unsafe { *p = 99 });
    }
}

/// A reader record given back and claimed again while a grace period scans it (a vCPU destroyed
/// and another created during a memslot update). The section before the give-back must be waited
/// for or have seen the publication, whoever holds the record when the updater reads it. Kills
/// the mutation that makes `synchronize` skip records whose `owned` flag reads false with a
/// Relaxed load (the give-back's Release is then not paired, so the old owner's reads are not
/// ordered before the reuse).
#[test]
fn reader_given_back_during_a_grace_period() {
    loom::model(|| {
        let s = Shared::new(1);
        let r = {
            let s = s.clone();
            thread::spawn(move || {
                let mut id = s.srcu.register().unwrap();
                let g = s.srcu.read_lock(&id);
                let i = s.active.load(Ordering::Acquire);
                // SAFETY: a read inside a read section: the grace period orders it before its
                // buffer's reuse (what the model checks; loom's cell reports an unordered access).
                let v = s.bufs[i].with(|p| unsafe { *p });
                drop(g);
                s.srcu.unregister(&mut id);
                assert!(v == 1 || v == 2, "reader saw {v}");
                // The record's next owner starts from an idle record.
                let id2 = s.srcu.register().unwrap();
                drop(s.srcu.read_lock(&id2));
            })
        };
        s.update();
        r.join().unwrap();
    });
}

/// A reader's section, then its next section nesting another inside it, all while one grace
/// period runs: the updater may stop waiting on the record when it reads the next section's
/// entry or its nested entry (an open section that began after the bump), and the earlier
/// section's reads must still be ordered before the reuse. The entry store's `Release` orders
/// them (the nested entry is `Relaxed`, but follows the entry's `SeqCst` reader fence, which
/// releases as well). Kills the mutation of the outermost entry store to `Relaxed` (which the
/// models above, one section per reader, let through).
#[test]
fn next_section_nests_during_a_grace_period() {
    loom::model(|| {
        let s = Shared::new(1);
        let id = s.srcu.register().unwrap();
        let r = {
            let s = s.clone();
            thread::spawn(move || {
                let g = s.srcu.read_lock(&id);
                let i = s.active.load(Ordering::Acquire);
                // SAFETY: a read inside a read section: the grace period orders it before its
                // buffer's reuse (what the model checks; loom's cell reports an unordered access).
                let v = s.bufs[i].with(|p| unsafe { *p });
                drop(g);
                assert!(v == 1 || v == 2, "reader saw {v}");
                let outer = s.srcu.read_lock(&id);
                let inner = s.srcu.read_lock(&id);
                thread::yield_now();
                drop(inner);
                drop(outer);
            })
        };
        s.update();
        r.join().unwrap();
    });
}
