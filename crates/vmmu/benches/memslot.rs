//! Memslot update and lookup cost at 10, 1000 and 32764 slots (one address space, one reader).
//!
//! - `lookup/find`: gfn -> slot in a read section (the gfn index's two searches), hits spread
//!   over the set;
//! - `lookup/find_cached`: the same through the per-vCPU last-used-slot cache, repeated gfns;
//! - `lookup/hva_range`: the slots meeting one host page (a host invalidation's lookup), spread;
//! - `update/flags_only`: one swap (toggle LOG_DIRTY_PAGES on one slot: bitmap + grace period);
//! - `update/move`: two swaps plus the flush hook (move one slot and back is two of these);
//! - `update/create_delete`: create a slot in a hole, then delete it (three swaps: the delete
//!   invalidates first);
//! - `update/create_delete_spread`: the same in a different hole each time.
//!
//! Updates change one index entry per set; their cost must stay flat as the set grows (no
//! copy of the set). `cargo bench -p vmmu --bench memslot`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::time::Duration;
use vmmu::memslot::{
    Memslots, MemslotsConfig, NoHooks, SlotCache, UserspaceMemoryRegion, KVM_MEM_LOG_DIRTY_PAGES,
};
use vmmu::{AsId, Gfn};

const SIZES: [u32; 3] = [10, 1000, 32764];

/// `n` one-page slots at gfns 0, 2, 4, ... (a hole after each).
fn vm(n: u32) -> Memslots {
    let m = Memslots::new(MemslotsConfig {
        nr_address_spaces: 1,
        max_readers: 2,
        ..Default::default()
    });
    for id in 0..n {
        m.set_memory_region(&region(id, 2 * id as u64, 0), &NoHooks).expect("setup slot");
    }
    m
}

fn region(id: u32, gfn: u64, flags: u32) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot: id,
        flags,
        guest_phys_addr: gfn << 12,
        memory_size: 4096,
        userspace_addr: (id as u64) << 12,
    }
}

/// Pseudo-random slot-hitting gfns (xorshift), so lookups do not walk one path only.
fn gfns(n: u32, count: usize) -> Vec<Gfn> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Gfn(2 * (x % n as u64))
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for n in SIZES {
        let m = vm(n);
        let r = m.register_reader().expect("reader");
        let probes = gfns(n, 4096);
        g.bench_with_input(BenchmarkId::new("find", n), &n, |b, _| {
            let guard = m.read(&r);
            let set = guard.set(AsId(0));
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(set.find(black_box(probes[i])).map(|s| s.id()))
            })
        });
        g.bench_with_input(BenchmarkId::new("find_cached", n), &n, |b, _| {
            let guard = m.read(&r);
            let set = guard.set(AsId(0));
            let mut cache = SlotCache::new();
            let gfn = probes[0];
            b.iter(|| black_box(set.find_cached(black_box(gfn), &mut cache).map(|s| s.id())))
        });
        // A host invalidation of one page (KVM `kvm_for_each_memslot_in_hva_range`): the slot
        // that maps it, through the host-range index.
        g.bench_with_input(BenchmarkId::new("hva_range", n), &n, |b, _| {
            let guard = m.read(&r);
            let set = guard.set(AsId(0));
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                let hva = vmmu::Hva((probes[i].0 / 2) << 12);
                let mut found = 0u32;
                set.for_each_in_hva_range(hva, vmmu::Hva(hva.0 + 4096), |s| {
                    found += s.id().0 as u32
                });
                black_box(found)
            })
        });
        g.bench_with_input(BenchmarkId::new("read_section_and_find", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                let guard = m.read(&r);
                black_box(guard.set(AsId(0)).find(black_box(probes[i])).map(|s| s.id()))
            })
        });
    }
    g.finish();
}

fn update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update");
    for n in SIZES {
        let m = vm(n);
        let mid = n / 2;
        g.bench_with_input(BenchmarkId::new("flags_only", n), &n, |b, _| {
            let mut on = false;
            b.iter(|| {
                on = !on;
                let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
                m.set_memory_region(&region(mid, 2 * mid as u64, flags), &NoHooks).expect("flags")
            })
        });
        g.bench_with_input(BenchmarkId::new("move", n), &n, |b, _| {
            let mut away = false;
            b.iter(|| {
                away = !away;
                // The hole after the slot.
                let gfn = 2 * mid as u64 + away as u64;
                m.set_memory_region(&region(mid, gfn, 0), &NoHooks).expect("move")
            })
        });
        // Slot `n - 1` (the last id at 32764 slots), deleted, then created again in the hole after
        // the middle slot and deleted, so that the set holds `n` slots with it.
        let mut r = region(n - 1, 2 * mid as u64 + 1, 0);
        r.memory_size = 0;
        m.set_memory_region(&r, &NoHooks).expect("delete the last slot");
        g.bench_with_input(BenchmarkId::new("create_delete", n), &n, |b, _| {
            b.iter(|| {
                r.memory_size = 4096;
                m.set_memory_region(&r, &NoHooks).expect("create");
                r.memory_size = 0;
                m.set_memory_region(&r, &NoHooks).expect("delete")
            })
        });
        // The same in a different hole each time (spread over the set): no edit lands where
        // the previous one did, so the indexes' fingers do not help and every edit searches.
        let holes = gfns(n, 4096);
        g.bench_with_input(BenchmarkId::new("create_delete_spread", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 4095;
                r.guest_phys_addr = (holes[i].0 + 1) << 12;
                // An alias of the host page of the slot before the hole.
                r.userspace_addr = (holes[i].0 / 2) << 12;
                r.memory_size = 4096;
                m.set_memory_region(&r, &NoHooks).expect("create");
                r.memory_size = 0;
                m.set_memory_region(&r, &NoHooks).expect("delete")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = lookup, update
}
criterion_main!(benches);
