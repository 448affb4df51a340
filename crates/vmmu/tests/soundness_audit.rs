//! Soundness review (audit 12c): safe call sequences that broke a precondition an `unsafe` block
//! of the core relies on. Safe code only.

#![cfg(not(loom))]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use vmmu::srcu::{ReaderFences, Srcu};

/// A "process-wide barrier" that does nothing: what a safe but wrong
/// `Sched::process_barrier` (or a caller of `Srcu::with_fences` /
/// `Memslots::try_with_fences`) could hand the core.
fn no_barrier() {}

/// A cheap hash of the round: the threads' varying delays.
fn mix(x: u32) -> u32 {
    let x = x.wrapping_mul(0x9e37_79b9);
    x ^ (x >> 15)
}

/// Store-buffering litmus on the SRCU protocol. The reader opens a section (record store,
/// compiler fence only: the asymmetric reader side) and loads `DATA`; the updater publishes
/// the round's number in `DATA` and calls `synchronize`. With a real process barrier, a reader that saw the old
/// `DATA` is waited for; with a barrier that does nothing, `synchronize` can return while that
/// reader is still inside its section: exactly what `MemslotSet::replace` (mutates the maps a
/// reader may still be reading) and `FrameAllocator::free_table` (frees a table a walker may
/// still read) rely on never happening. Returns how many of `rounds` rounds saw it.
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

/// The hole: `ReaderFences::Asymmetric` takes any `fn()`, in safe code, and `Sched` is a safe
/// trait whose `process_barrier` picks it for the VM's two SRCU domains. One test (not two), so
/// the control and the litmus do not share the CPUs.
#[test]
fn a_no_op_process_barrier_lets_a_grace_period_miss_a_reader() {
    assert_eq!(missed_grace_periods(ReaderFences::Full, 20_000), 0, "full fences never miss");
    let mut missed = 0;
    for _ in 0..20 {
        missed += missed_grace_periods(ReaderFences::Asymmetric(no_barrier), 20_000);
        if missed > 0 {
            break;
        }
    }
    assert!(missed > 0, "the litmus never showed the reordering on this machine");
}
