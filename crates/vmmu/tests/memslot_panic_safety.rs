//! Panic safety of the memslot update (`Memslots::set_memory_region`, `MemslotSet::replace`):
//! a hook that panics in the middle of a swap (the grace-period wait's `relax`, the wrap hook)
//! unwinds through the slots lock, which is released. The set it unpublished may still be held
//! by a reader (the grace period never completed), so the next update must not edit it.
//! `MemslotHooks` is a safe trait, so this is reachable from safe code (through a `Vm`, a host
//! whose `Sched::relax` panics).
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmmu::memslot::{
    Memslot, MemslotHooks, Memslots, MemslotsConfig, NoHooks, UserspaceMemoryRegion,
};
use vmmu::{AsId, Generation};

/// Hooks whose grace-period wait panics on its first turn (a host watchdog, say).
struct PanickyRelax(AtomicBool);

impl MemslotHooks for PanickyRelax {
    fn flush_slot(&self, _old: &Memslot) {}
    fn memslots_updated(&self, _as_id: AsId, _new_gen: Generation) {}
    fn relax(&self) {
        if !self.0.swap(true, Ordering::Relaxed) {
            panic!("host watchdog: grace period too slow");
        }
    }
}

fn slot(id: u32, gpa: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion::new(id, 0, gpa, 0x1000, 0x7000_0000 + gpa)
}

#[test]
fn an_update_after_a_torn_swap_does_not_edit_a_set_a_reader_holds() {
    let m = Memslots::new(MemslotsConfig { nr_address_spaces: 1, ..Default::default() });
    let reader = m.register_reader().unwrap();
    let observer = m.register_reader().unwrap();
    m.set_memory_region(&slot(0, 0), &NoHooks).unwrap();

    std::thread::scope(|s| {
        let guard = m.read(&reader);
        let held = guard.set(AsId(0));
        assert_eq!(held.len(), 1);

        // Update 1 publishes the other set, then its grace-period wait (on our section) panics.
        let torn = s
            .spawn(|| {
                let hooks = PanickyRelax(AtomicBool::new(false));
                catch_unwind(AssertUnwindSafe(|| m.set_memory_region(&slot(1, 0x10_0000), &hooks)))
            })
            .join()
            .unwrap();
        assert!(torn.is_err(), "the hook's panic unwound out of the update");

        // Update 2 must not edit `held`: this section, which holds it, is still open.
        let next = s.spawn(|| {
            catch_unwind(AssertUnwindSafe(|| m.set_memory_region(&slot(2, 0x20_0000), &NoHooks)))
        });
        // Wait until update 2 returned (or panicked), or published `held` (then it waits for us).
        let published_held = || std::ptr::eq(m.read(&observer).set(AsId(0)), held);
        let t0 = Instant::now();
        while !next.is_finished() && !published_held() {
            assert!(t0.elapsed() < Duration::from_secs(10), "update 2 neither ended nor published");
            std::thread::yield_now();
        }
        // Update 2 panics (the memslots are torn). Were it to go on, both exits would order
        // update 2's edits before this read (`is_finished` and the join, or the
        // Acquire load of the published set, stored with Release after the edit).
        assert_eq!(
            held.len(),
            1,
            "an update edited the memslot set a reader is reading (MemslotSet::replace's \
             precondition broken: the torn swap's grace period never completed)"
        );
        drop(guard);
        let after = next.join().unwrap();
        assert!(after.is_err(), "an update after a torn swap refuses to run (it panics)");
    });
}
