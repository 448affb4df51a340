//! Group 2: gfn -> memslot lookup (KVM `search_memslots`) at 10, 1000 and 32764 slots, inside a
//! read section, with probes spread pseudo-randomly over the slots; and a hit of the per-vCPU
//! last-used-slot cache (KVM `kvm_vcpu_gfn_to_memslot` with `last_used_slot`).
//!
//! Slots are one page each at even gfns (a hole after each), so every probe hits a slot.

use crate::table::{Row, Unit};
use crate::timing::per_call;
use crate::{BenchError, Options};
use std::hint::black_box;
use vmmu::memslot::{Memslots, MemslotsConfig, NoHooks, SlotCache, UserspaceMemoryRegion};
use vmmu::{AsId, Gfn};

const G: &str = "lookup";
/// Slot counts measured.
pub const SIZES: [u32; 3] = [10, 1000, 32764];

/// `n` one-page slots at gfns 0, 2, 4, ...
pub fn memslots(n: u32) -> Result<Memslots, BenchError> {
    let m = Memslots::new(MemslotsConfig {
        nr_address_spaces: 1,
        max_readers: 2,
        ..Default::default()
    });
    for id in 0..n {
        let r = UserspaceMemoryRegion {
            slot: id,
            flags: 0,
            guest_phys_addr: u64::from(id) << 13,
            memory_size: 4096,
            userspace_addr: u64::from(id) << 12,
        };
        m.set_memory_region(&r, &NoHooks)
            .map_err(|err| BenchError::Memslot { what: format!("setup slot {id}"), err })?;
    }
    Ok(m)
}

/// Pseudo-random slot-hitting gfns (xorshift).
pub fn probes(n: u32, count: usize) -> Vec<Gfn> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Gfn(2 * (x % u64::from(n)))
        })
        .collect()
}

/// The group's rows.
pub fn run(opts: &Options) -> Result<Vec<Row>, BenchError> {
    let batches = opts.n(300, 3000);
    let mut rows = Vec::new();
    let mut at10 = f64::NAN;
    let mut last;
    for n in SIZES {
        let m = memslots(n)?;
        let r = m.register_reader().map_err(|e| BenchError::Harness(e.to_string()))?;
        let p = probes(n, 4096);
        let guard = m.read(&r);
        let set = guard.set(AsId(0));
        if p.iter().any(|g| set.find(*g).is_none()) {
            return Err(BenchError::Harness("a probe missed its slot".into()));
        }
        let mut i = 0usize;
        let s = per_call(batches, 1000, || {
            i = (i + 1) & 4095;
            black_box(set.find(black_box(p[i])).map(|s| s.id()));
        });
        if n == 10 {
            at10 = s.median;
        }
        last = s.median;
        let mut row = Row::new(G, format!("find, {n} slots"), Unit::Ns, s.median)
            .p99(s.p99)
            .ratio(s.median / at10, "x at 10 slots");
        if n == 32764 {
            row = row.target("<= 30 ns", s.median <= 30.0);
        }
        rows.push(row);
        if n == 32764 {
            let mut cache = SlotCache::new();
            let g = p[0];
            let s = per_call(batches, 1000, || {
                black_box(set.find_cached(black_box(g), &mut cache).map(|s| s.id()));
            });
            if cache.hits() < 1000 * batches as u64 {
                return Err(BenchError::Harness("last-used cache did not hit".into()));
            }
            rows.push(
                Row::new(G, format!("last-used slot hit, {n} slots"), Unit::Ns, s.median)
                    .p99(s.p99)
                    .ratio(s.median / last, "x full find")
                    .target("<= 3 ns", s.median <= 3.0),
            );
        }
    }
    Ok(rows)
}
