//! Property test: random sequences of `set_memory_region` (good and bad inputs, both address
//! spaces, small limits so every rule fires) against a naive reference model written from facts
//! §5.3 and §2.2: a vector of slots, the checks in KVM's order, generation arithmetic and the
//! hook calls. Results, errnos, rules, lookups of every gfn, generations, hook logs, page totals
//! and metadata bytes must agree after every step.
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use proptest::prelude::*;
use std::sync::Mutex;
use vmmu::memslot::{
    Memslot, MemslotChange, MemslotHooks, Memslots, MemslotsConfig, SlotCache,
    UserspaceMemoryRegion,
};
use vmmu::{AsId, Generation, Gfn};

const MAX_GPA_BITS: u8 = 18; // max gfn 63
const VA_LIMIT: u64 = 0x40_0000;
const MAX_TOTAL_PAGES: u64 = 40;
const META_CAP: u64 = 64; // bytes: a bitmap is 16 bytes per 64 pages
const GFNS: u64 = 72;

#[derive(Clone, PartialEq, Eq, Debug)]
enum Ev {
    Flush(u16, u16, u64),
    Updated(u16, u64),
}

#[derive(Default)]
struct Log(Mutex<Vec<Ev>>);
impl MemslotHooks for Log {
    fn flush_slot(&self, old: &Memslot) {
        self.0.lock().unwrap().push(Ev::Flush(old.as_id().0, old.id().0, old.base_gfn().0));
    }
    fn memslots_updated(&self, as_id: AsId, g: Generation) {
        self.0.lock().unwrap().push(Ev::Updated(as_id.0, g.raw()));
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct MSlot {
    as_id: u16,
    id: u16,
    base: u64,
    npages: u64,
    hva: u64,
    flags: u32,
}

/// The naive model.
struct Model {
    nr_as: u16,
    slots: Vec<MSlot>,
    gens: Vec<u64>,
    log: Vec<Ev>,
    meta: u64,
}

fn bitmap(npages: u64) -> u64 {
    2 * npages.div_ceil(64) * 8
}

impl Model {
    fn swap(&mut self, a: u16) {
        self.gens[a as usize] += self.nr_as as u64;
        self.log.push(Ev::Updated(a, self.gens[a as usize]));
    }

    fn apply(&mut self, r: &UserspaceMemoryRegion) -> Result<MemslotChange, &'static str> {
        let (a, id) = ((r.slot >> 16) as u16, r.slot as u16);
        let (gpa, size, hva, flags) = (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.flags);
        if flags & !3 != 0 {
            return Err("invalid-flags");
        }
        if id >= 32764 {
            return Err("slot-id-not-user");
        }
        if size % 4096 != 0 {
            return Err("size-not-aligned");
        }
        if gpa % 4096 != 0 {
            return Err("gpa-not-aligned");
        }
        if hva % 4096 != 0 {
            return Err("hva-not-aligned");
        }
        if size > VA_LIMIT || hva > VA_LIMIT - size {
            return Err("hva-range-not-user");
        }
        if a >= self.nr_as {
            return Err("no-such-address-space");
        }
        if gpa.checked_add(size).is_none() {
            return Err("gpa-range-wraps");
        }
        let npages = size / 4096;
        if npages > (1 << 31) - 1 {
            return Err("too-many-pages");
        }
        let base = gpa / 4096;
        let old = self.slots.iter().position(|s| s.as_id == a && s.id == id);
        if npages == 0 {
            let Some(i) = old else { return Err("delete-missing-slot") };
            let o = self.slots[i];
            self.swap(a);
            self.log.push(Ev::Flush(a, id, o.base));
            self.swap(a);
            self.slots.remove(i);
            if o.flags & 1 != 0 {
                self.meta -= bitmap(o.npages);
            }
            return Ok(MemslotChange::Delete);
        }
        let change = match old.map(|i| self.slots[i]) {
            None => {
                let total: u64 = self.slots.iter().map(|s| s.npages).sum();
                if total + npages > MAX_TOTAL_PAGES {
                    return Err("total-pages-overflow");
                }
                MemslotChange::Create
            }
            Some(o) => {
                if hva != o.hva || npages != o.npages || (flags ^ o.flags) & 2 != 0 {
                    return Err("fixed-field-changed");
                }
                if base != o.base {
                    MemslotChange::Move
                } else if flags != o.flags {
                    MemslotChange::FlagsOnly
                } else {
                    return Ok(MemslotChange::NoOp);
                }
            }
        };
        let moving = change != MemslotChange::FlagsOnly;
        if moving
            && self.slots.iter().any(|s| {
                s.as_id == a && s.id != id && s.base < base + npages && base < s.base + s.npages
            })
        {
            return Err("overlap");
        }
        let was_dirty = old.is_some_and(|i| self.slots[i].flags & 1 != 0);
        if change == MemslotChange::Move {
            self.swap(a);
            self.log.push(Ev::Flush(a, id, self.slots[old.unwrap()].base));
        }
        let mut fail = None;
        let new_bitmap = flags & 1 != 0 && !was_dirty;
        if new_bitmap && self.meta + bitmap(npages) > META_CAP {
            fail = Some("out-of-memory");
        } else if moving && base + npages - 1 > (1 << (MAX_GPA_BITS - 12)) - 1 {
            fail = Some("beyond-max-gfn");
        }
        if let Some(e) = fail {
            if change == MemslotChange::Move {
                self.swap(a);
            }
            return Err(e);
        }
        self.swap(a);
        if new_bitmap {
            self.meta += bitmap(npages);
        }
        if was_dirty && flags & 1 == 0 {
            self.meta -= bitmap(npages);
        }
        let new = MSlot { as_id: a, id, base, npages, hva, flags };
        match old {
            Some(i) => self.slots[i] = new,
            None => self.slots.push(new),
        }
        Ok(change)
    }

    fn find(&self, a: u16, gfn: u64) -> Option<(u16, u64, u64, u32)> {
        self.slots
            .iter()
            .find(|s| s.as_id == a && s.base <= gfn && gfn < s.base + s.npages)
            .map(|s| (s.id, s.base, s.npages, s.flags))
    }
}

/// Raw requests: every field random, mostly rejected by the early rules.
fn raw_region() -> impl Strategy<Value = UserspaceMemoryRegion> {
    let as_id = prop_oneof![8 => 0u32..2, 1 => Just(2u32)];
    let id = prop_oneof![12 => 0u32..4, 1 => Just(32764u32), 1 => Just(0xffffu32)];
    let flags = prop_oneof![8 => 0u32..4, 1 => Just(4u32), 1 => Just(1u32 << 31)];
    let page = |max: u64| (0..max).prop_map(|p| p * 4096);
    let gpa = prop_oneof![10 => page(70), 1 => Just(8u64), 1 => Just(!4095u64)];
    let size = prop_oneof![3 => Just(0u64), 10 => (1u64..12).prop_map(|p| p * 4096), 1 => Just(100u64), 1 => Just(1u64 << 43)];
    let hva = prop_oneof![10 => (0u64..4).prop_map(|p| p * 0x10_0000), 1 => Just(0x10u64), 1 => Just(VA_LIMIT)];
    (as_id, id, flags, gpa, size, hva).prop_map(|(a, id, flags, gpa, size, hva)| {
        UserspaceMemoryRegion {
            slot: (a << 16) | id,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        }
    })
}

/// Well-formed requests: hva and (usually) size follow from the slot id, so re-sets of an
/// existing slot reach the move / flags-only / no-op / overlap / max-gfn / allocation rules.
fn good_region() -> impl Strategy<Value = UserspaceMemoryRegion> {
    let size = prop_oneof![6 => Just(None), 2 => Just(Some(0u64)), 1 => (1u64..10).prop_map(Some)];
    (0u32..2, 0u32..4, 0u32..8, (0u64..4, 0u64..66), size).prop_map(
        |(a, id, fsel, (sel, rnd), size)| {
            // READONLY mostly follows the slot id (odd ids), so modifications rarely toggle it.
            let flags = if fsel < 6 { (fsel & 1) | (id & 1) << 1 } else { fsel & 3 };
            // Two home places per slot (so re-sets often keep or swap the base), or anywhere.
            let base = match sel {
                0 | 1 => id as u64 * 8 + sel * 32,
                _ => rnd,
            };
            let npages = size.unwrap_or(id as u64 * 3 + 1);
            UserspaceMemoryRegion {
                slot: (a << 16) | id,
                flags,
                guest_phys_addr: base * 4096,
                memory_size: npages * 4096,
                userspace_addr: (a as u64 * 4 + id as u64) * 0x1_0000,
            }
        },
    )
}

fn region() -> impl Strategy<Value = UserspaceMemoryRegion> {
    prop_oneof![3 => good_region(), 1 => raw_region()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_reference_model(two_as in any::<bool>(), ops in prop::collection::vec(region(), 1..40)) {
        let nr_as = if two_as { 2 } else { 1 };
        let m = Memslots::new(MemslotsConfig {
            nr_address_spaces: nr_as,
            max_gpa_bits: MAX_GPA_BITS,
            user_va_limit: VA_LIMIT,
            max_readers: 1,
            max_total_pages: MAX_TOTAL_PAGES,
            metadata_limit: Some(META_CAP),
            ..Default::default()
        });
        let mut model = Model { nr_as, slots: Vec::new(), gens: (0..nr_as as u64).collect(), log: Vec::new(), meta: 0 };
        let reader = m.register_reader().unwrap();
        let mut caches: Vec<SlotCache> = (0..nr_as).map(|_| SlotCache::new()).collect();
        let hooks = Log::default();
        for (step, op) in ops.iter().enumerate() {
            let got = m.set_memory_region(op, &hooks).map_err(|e| (e.rule(), e.errno()));
            if let Err((rule, errno)) = got {
                let want_errno = match rule { "overlap" => "EEXIST", "out-of-memory" => "ENOMEM", _ => "EINVAL" };
                prop_assert_eq!(errno, want_errno);
            }
            let want = model.apply(op);
            prop_assert_eq!(got.map_err(|e| e.0), want, "step {} {:?}", step, op);
            if want.is_err() {
                // A rejected request leaves no hidden state: running it again gives the same.
                let again = m.set_memory_region(op, &hooks).map_err(|e| e.rule());
                prop_assert_eq!(again, model.apply(op), "step {} again", step);
            }
            prop_assert_eq!(&*hooks.0.lock().unwrap(), &model.log, "hook log at step {}", step);
            for a in 0..nr_as {
                prop_assert_eq!(m.generation(AsId(a)).raw(), model.gens[a as usize]);
            }
            prop_assert_eq!(m.nr_memslot_pages(), model.slots.iter().map(|s| s.npages).sum::<u64>());
            prop_assert_eq!(m.metadata_bytes(), model.meta);
            let g = m.read(&reader);
            for a in 0..nr_as {
                let set = g.set(AsId(a));
                prop_assert_eq!(set.len(), model.slots.iter().filter(|s| s.as_id == a).count());
                for gfn in 0..GFNS {
                    let want = model.find(a, gfn);
                    let got = set.find(Gfn(gfn)).map(|s| (s.id().0, s.base_gfn().0, s.npages(), s.flags()));
                    prop_assert_eq!(got, want, "AS {} gfn {}", a, gfn);
                    let cached = set.find_cached(Gfn(gfn), &mut caches[a as usize])
                        .map(|s| (s.id().0, s.base_gfn().0, s.npages(), s.flags()));
                    prop_assert_eq!(cached, want, "cached AS {} gfn {}", a, gfn);
                }
                let (lo, hi) = (10, 30);
                let got: Vec<u16> = set.iter_range(Gfn(lo), Gfn(hi)).map(|s| s.id().0).collect();
                let mut want: Vec<(u64, u16)> = model.slots.iter()
                    .filter(|s| s.as_id == a && s.base < hi && lo < s.base + s.npages)
                    .map(|s| (s.base, s.id)).collect();
                want.sort();
                prop_assert_eq!(got, want.into_iter().map(|x| x.1).collect::<Vec<_>>());
            }
        }
    }
}
