//! Generation sequences and hook calls of the memslot protocol (facts §2.2-2.4): swaps per
//! change, generation arithmetic per address space, hook order, and what the hooks see.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

mod catchers;
mod common;

use std::sync::{Arc, Mutex};
use vmmu::memslot::{
    Memslot, MemslotChange, MemslotHooks, Memslots, MemslotsConfig, UserspaceMemoryRegion,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use vmmu::{AsId, Generation, Gfn};

#[derive(Clone, PartialEq, Eq, Debug)]
enum Ev {
    Flush {
        as_id: u16,
        id: u16,
        base: u64,
    },
    /// `new_gen`, and the generation `Memslots::generation` showed inside the hook.
    Updated {
        as_id: u16,
        new_gen: u64,
        seen: Generation,
    },
}

/// Records hook calls, with what the VM shows while the hook runs.
struct Recorder {
    vm: Mutex<Option<Arc<Memslots>>>,
    log: Mutex<Vec<Ev>>,
}

impl Recorder {
    fn new() -> Self {
        Recorder { vm: Mutex::new(None), log: Mutex::new(Vec::new()) }
    }
    fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl MemslotHooks for Recorder {
    fn flush_slot(&self, old: &Memslot) {
        assert!(!old.is_invalid(), "flush_slot gets the slot as it was");
        self.log.lock().unwrap().push(Ev::Flush {
            as_id: old.as_id().0,
            id: old.id().0,
            base: old.base_gfn().0,
        });
    }
    fn memslots_updated(&self, as_id: AsId, new_gen: Generation) {
        let seen = self.vm.lock().unwrap().as_ref().unwrap().generation(as_id);
        self.log.lock().unwrap().push(Ev::Updated { as_id: as_id.0, new_gen: new_gen.raw(), seen });
    }
}

fn vm(cfg: MemslotsConfig) -> (Arc<Memslots>, Recorder) {
    let m = Arc::new(Memslots::new(cfg));
    let r = Recorder::new();
    *r.vm.lock().unwrap() = Some(m.clone());
    (m, r)
}

fn r(as_id: u32, id: u32, flags: u32, gpa: u64, size: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot: (as_id << 16) | id,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: 0x4000_0000,
    }
}

/// An update event as the correct protocol produces it: the hook sees the in-progress marker.
fn up(as_id: u16, new_gen: u64, nr_as: u64) -> Ev {
    Ev::Updated { as_id, new_gen, seen: Generation::from_raw(new_gen - nr_as).mark_in_progress() }
}

#[test]
fn sequence_two_address_spaces() {
    let (m, h) = vm(MemslotsConfig::default());
    assert_eq!((m.generation(AsId(0)).raw(), m.generation(AsId(1)).raw()), (0, 1));

    assert_eq!(m.set_memory_region(&r(0, 1, 0, 0x10_0000, 0x2000), &h), Ok(MemslotChange::Create));
    assert_eq!(h.take(), [up(0, 2, 2)]);
    assert_eq!(m.set_memory_region(&r(1, 1, 0, 0x10_0000, 0x2000), &h), Ok(MemslotChange::Create));
    assert_eq!(h.take(), [up(1, 3, 2)]);

    assert_eq!(
        m.set_memory_region(&r(0, 1, KVM_MEM_LOG_DIRTY_PAGES, 0x10_0000, 0x2000), &h),
        Ok(MemslotChange::FlagsOnly)
    );
    assert_eq!(h.take(), [up(0, 4, 2)]);

    assert_eq!(
        m.set_memory_region(&r(0, 1, KVM_MEM_LOG_DIRTY_PAGES, 0x10_0000, 0x2000), &h),
        Ok(MemslotChange::NoOp)
    );
    assert_eq!(h.take(), []);
    assert_eq!(m.generation(AsId(0)).raw(), 4, "a no-op leaves the generation");

    assert_eq!(
        m.set_memory_region(&r(0, 1, KVM_MEM_LOG_DIRTY_PAGES, 0x20_0000, 0x2000), &h),
        Ok(MemslotChange::Move)
    );
    assert_eq!(h.take(), [up(0, 6, 2), Ev::Flush { as_id: 0, id: 1, base: 0x100 }, up(0, 8, 2)]);

    assert_eq!(m.set_memory_region(&r(1, 1, 0, 0, 0), &h), Ok(MemslotChange::Delete));
    assert_eq!(h.take(), [up(1, 5, 2), Ev::Flush { as_id: 1, id: 1, base: 0x100 }, up(1, 7, 2)]);

    // A rejected request runs no hook and changes no generation.
    assert!(m.set_memory_region(&r(1, 1, 0, 0, 0), &h).is_err());
    assert_eq!(h.take(), []);
    assert_eq!((m.generation(AsId(0)).raw(), m.generation(AsId(1)).raw()), (8, 7));
    assert_eq!(m.generation(AsId(0)).raw() % 2, 0);
    assert_eq!(m.generation(AsId(1)).raw() % 2, 1);
}

#[test]
fn sequence_one_address_space() {
    let (m, h) = vm(MemslotsConfig { nr_address_spaces: 1, ..Default::default() });
    m.set_memory_region(&r(0, 0, 0, 0, 0x1000), &h).unwrap();
    m.set_memory_region(&r(0, 0, 0, 0x1000, 0x1000), &h).unwrap();
    m.set_memory_region(&r(0, 0, 0, 0, 0), &h).unwrap();
    let gens: Vec<u64> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Updated { new_gen, .. } => Some(new_gen),
            Ev::Flush { .. } => None,
        })
        .collect();
    assert_eq!(gens, [1, 2, 3, 4, 5]);
}

#[test]
fn invalid_slot_is_visible_during_the_flush() {
    // The flush hook runs after the invalid copy is published: a reader sees it invalid.
    struct Check(Arc<Memslots>, vmmu::srcu::ReaderId, Mutex<u32>);
    impl MemslotHooks for Check {
        fn flush_slot(&self, old: &Memslot) {
            let g = self.0.read(&self.1);
            let s = g.set(old.as_id()).find(old.base_gfn()).copied().unwrap();
            assert!(s.is_invalid() && s.id() == old.id());
            assert!(
                !g.set(old.as_id()).generation().in_progress(),
                "the invalidating swap is complete"
            );
            *self.2.lock().unwrap() += 1;
        }
        fn memslots_updated(&self, _: AsId, _: Generation) {}
    }
    let m = Arc::new(Memslots::new(MemslotsConfig::default()));
    let c = Check(m.clone(), m.register_reader().unwrap(), Mutex::new(0));
    m.set_memory_region(&r(0, 3, 0, 0x5000, 0x1000), &c).unwrap();
    m.set_memory_region(&r(0, 3, 0, 0x9000, 0x1000), &c).unwrap();
    m.set_memory_region(&r(0, 3, 0, 0, 0), &c).unwrap();
    assert_eq!(*c.2.lock().unwrap(), 2);
    let g = m.read(&c.1);
    assert!(g.set(AsId(0)).find(Gfn(9)).is_none());
}

#[test]
fn generation_base_reaches_the_mmio_wrap() {
    let base = (1u64 << 19) - 4;
    let (m, h) = vm(MemslotsConfig { generation_base: base, ..Default::default() });
    for i in 0..3u32 {
        m.set_memory_region(&r(0, i, 0, (i as u64) << 20, 0x1000), &h).unwrap();
        m.set_memory_region(&r(1, i, 0, (i as u64) << 20, 0x1000), &h).unwrap();
    }
    let wraps: Vec<(u16, u64)> = h
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Updated { as_id, new_gen, .. } if Generation::from_raw(new_gen).is_mmio_wrap(2) => {
                Some((as_id, new_gen))
            }
            _ => None,
        })
        .collect();
    assert_eq!(wraps, [(0, 1 << 19), (1, (1 << 19) + 1)], "each AS wraps once, at 2^19");
    assert_eq!(m.generation(AsId(0)).raw() % 2, 0);
    assert_eq!(m.generation(AsId(1)).raw() % 2, 1);
}

/// The MMIO-generation wrap zap is done before the post-wrap generation is visible: an access
/// made while the wrap hook runs cannot hit a pre-wrap MMIO SPTE (`catchers` says how).
#[test]
fn access_during_the_wrap_hook_reaches_ram() {
    assert_eq!(catchers::catch_wrap_hook_vs_prewrap_spte(vmmu::bugs::BugSet::NONE), None);
}

#[cfg(feature = "historical-bugs")]
mod bugs {
    use super::catchers::catch_wrap_hook_vs_prewrap_spte;
    use vmmu::bugs::{Bug, BugSet};

    /// Caught by its harm: with the hook after the final store, the access made while it runs
    /// sees the post-wrap generation, hits the pre-wrap MMIO SPTE and is emulated as MMIO for a
    /// gfn that is RAM in the set it reads.
    #[test]
    fn access_during_the_wrap_hook_catches_wrap_hook_after_publish() {
        let harm = catch_wrap_hook_vs_prewrap_spte(BugSet::only(Bug::WrapHookAfterPublish))
            .expect("wrap-hook-after-publish missed");
        assert!(harm.seen.contains("MmioSpteHit"), "{harm}");
    }

    /// The same harm: without the second increment the final generation is visible from the
    /// publication on, and the wrap hook runs after it.
    #[test]
    fn access_during_the_wrap_hook_catches_no_second_increment() {
        let harm = catch_wrap_hook_vs_prewrap_spte(BugSet::only(Bug::NoSecondIncrement))
            .expect("no-second-increment missed");
        assert!(harm.seen.contains("MmioSpteHit"), "{harm}");
    }
}
