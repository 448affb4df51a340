//! Soundness review (audit 12c): safe call sequences that broke a precondition an `unsafe` block
//! of the core relies on. Safe code only.

#![cfg(not(loom))]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vmmu::srcu::{ReaderFences, Srcu};

/// A cheap hash of the round: the threads' varying delays.
fn mix(x: u32) -> u32 {
    let x = x.wrapping_mul(0x9e37_79b9);
    x ^ (x >> 15)
}

/// Store-buffering litmus on the SRCU protocol. The reader opens a section and loads `data`;
/// the updater publishes the round's number in `data` and calls `synchronize`. A reader that saw
/// an older value must be waited for: `synchronize` may not return while its section is open.
/// That is what `MemslotSet::replace` (edits maps a reader may still read) and
/// `FrameAllocator::free_table` (frees a table a walker may still read) rely on. Returns in how
/// many of `rounds` rounds a grace period missed such a reader.
fn missed_grace_periods(fences: ReaderFences, rounds: u32) -> u32 {
    let srcu = Arc::new(Srcu::with_fences(2, fences));
    let data = Arc::new(AtomicU32::new(0));
    let arrived = Arc::new(AtomicU32::new(0));
    let synced = Arc::new(AtomicU32::new(0));
    let reader = {
        let (srcu, data, arrived, synced) =
            (srcu.clone(), data.clone(), arrived.clone(), synced.clone());
        std::thread::spawn(move || {
            let id = srcu.register().unwrap();
            let mut missed = 0;
            for round in 1..=rounds {
                // Both threads leave this barrier together, then each waits a varying while.
                arrived.fetch_add(1, Ordering::AcqRel);
                while arrived.load(Ordering::Acquire) < 2 * round {
                    std::hint::spin_loop();
                }
                for _ in 0..(mix(round) % 64) {
                    std::hint::spin_loop();
                }
                let g = srcu.read_lock(&id);
                if data.load(Ordering::Relaxed) < round {
                    // Still reading what was there before this round's publication: this
                    // round's grace period may not end before the section does.
                    for _ in 0..2_000 {
                        if synced.load(Ordering::Acquire) >= round {
                            missed += 1;
                            break;
                        }
                        std::hint::spin_loop();
                    }
                }
                drop(g);
            }
            missed
        })
    };
    let relax = vmmu::Spin;
    for round in 1..=rounds {
        arrived.fetch_add(1, Ordering::AcqRel);
        while arrived.load(Ordering::Acquire) < 2 * round {
            std::hint::spin_loop();
        }
        for _ in 0..(mix(round ^ 0x5555) % 64) {
            std::hint::spin_loop();
        }
        data.store(round, Ordering::Release);
        srcu.synchronize(&relax);
        synced.store(round, Ordering::Release);
    }
    reader.join().unwrap()
}

/// The SRCU guarantee the litmus checks, with full fences. The same litmus with
/// `ReaderFences::Asymmetric` around a function that does nothing, which safe code could build
/// until `ProcessBarrier` (commit 33bbcc9 of the review), missed 16 to 144 readers in 20,000
/// rounds on a 2-core x86 machine; now only `unsafe` code can make such a barrier (the
/// `compile_fail` example on `vmmu::srcu::ProcessBarrier`).
#[test]
fn a_grace_period_never_misses_a_reader_that_saw_the_old_data() {
    assert_eq!(missed_grace_periods(ReaderFences::Full, 20_000), 0);
}
