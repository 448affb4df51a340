//! Readers looping lookups while updates run (std threads): no torn results, generations
//! monotonic per reader, the generation of a set always matches its contents, and a reader that
//! sees a final generation made its earlier decision on that same set.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use vmmu::memslot::{
    MemslotSet, Memslots, MemslotsConfig, NoHooks, SlotCache, UserspaceMemoryRegion,
};
use vmmu::{AsId, Gfn};

const A: u64 = 0x100;
const B: u64 = 0x200;
const PAGES: u64 = 16;
const HVA: u64 = 0x7000_0000;

/// What the two probe gfns show.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Content {
    None,
    ValidA,
    InvalidA,
    ValidB,
    InvalidB,
}

/// The contents after swap `k` of the cycle create(A) / move(A->B) / delete.
fn expected(k: u64) -> Content {
    if k == 0 {
        return Content::None;
    }
    match (k - 1) % 5 {
        0 => Content::ValidA,
        1 => Content::InvalidA,
        2 => Content::ValidB,
        3 => Content::InvalidB,
        _ => Content::None,
    }
}

fn content(s: &MemslotSet) -> Content {
    let probe = |g: u64| {
        s.find(Gfn(g + 3)).map(|x| {
            assert!(x.contains(Gfn(g + 3)) && x.npages() == PAGES && x.base_gfn() == Gfn(g));
            assert_eq!(x.hva_of(Gfn(g + 3)).raw(), HVA + 3 * 4096, "torn slot");
            x.is_invalid()
        })
    };
    match (probe(A), probe(B)) {
        (None, None) => Content::None,
        (Some(false), None) => Content::ValidA,
        (Some(true), None) => Content::InvalidA,
        (None, Some(false)) => Content::ValidB,
        (None, Some(true)) => Content::InvalidB,
        (a, b) => panic!("both probes hit: {a:?} {b:?}"),
    }
}

/// The swap whose contents a set with this generation holds (AS 0 of a 2-AS VM, base 0).
fn swap_index(gen: vmmu::Generation) -> u64 {
    if gen.in_progress() {
        gen.counter() / 2 + 1
    } else {
        gen.counter() / 2
    }
}

#[test]
fn readers_race_updates() {
    const CYCLES: u64 = 200;
    let m = Arc::new(Memslots::new(MemslotsConfig { max_readers: 4, ..Default::default() }));
    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (m, stop, running) = (m.clone(), stop.clone(), running.clone());
            let id = m.register_reader().unwrap();
            std::thread::spawn(move || {
                let mut last = 0;
                let mut cache = SlotCache::new();
                let mut sections = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let g = m.read(&id);
                    let s1 = g.set(AsId(0));
                    let gen1 = s1.generation();
                    let c1 = content(s1);
                    let k1 = swap_index(gen1);
                    assert_eq!(c1, expected(k1), "set with {gen1:?} holds other contents");
                    let cached =
                        s1.find_cached(Gfn(A + 1), &mut cache).map(|x| (x.base_gfn(), x.flags()));
                    assert_eq!(
                        cached,
                        s1.find(Gfn(A + 1)).map(|x| (x.base_gfn(), x.flags())),
                        "stale cache"
                    );
                    let gen2 = g.set(AsId(0)).generation();
                    let k2 = swap_index(gen2);
                    assert!(k1 <= k2 && last <= k1, "generations went back: {last} {k1} {k2}");
                    if !gen2.in_progress() {
                        assert_eq!(
                            k1, k2,
                            "final generation {gen2:?} seen after deciding on {gen1:?}"
                        );
                    }
                    last = k2;
                    drop(g);
                    sections += 1;
                    if sections == 1 {
                        running.fetch_add(1, Ordering::AcqRel);
                    }
                }
                sections
            })
        })
        .collect();
    let r = |gpa: u64, size: u64| UserspaceMemoryRegion {
        slot: 1,
        flags: 0,
        guest_phys_addr: gpa << 12,
        memory_size: size,
        userspace_addr: HVA,
    };
    while running.load(Ordering::Acquire) < 2 {
        std::thread::yield_now();
    }
    for _ in 0..CYCLES {
        m.set_memory_region(&r(A, PAGES << 12), &NoHooks).unwrap();
        m.set_memory_region(&r(B, PAGES << 12), &NoHooks).unwrap();
        m.set_memory_region(&r(0, 0), &NoHooks).unwrap();
    }
    stop.store(true, Ordering::Release);
    for t in readers {
        assert!(t.join().unwrap() > 0, "the reader never ran");
    }
    assert_eq!(m.generation(AsId(0)).raw(), CYCLES * 5 * 2);
}
