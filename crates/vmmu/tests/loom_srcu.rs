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
