//! Table-driven test of `set_memory_region`'s checks: every row of facts §5.3 and of
//! kvm-tests-and-figures §2 that applies to an x86 VM without private memory, including rows
//! where two rules fail and KVM's order decides. Each row runs on a fresh VM with the same
//! slots; a rejected row must leave the slots, the generations and the hooks untouched (except
//! a move rejected after its invalidation, which KVM reverts with a second swap).
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

use std::sync::Mutex;
use vmmu::memslot::{
    Memslot, MemslotChange, MemslotHooks, Memslots, MemslotsConfig, UserspaceMemoryRegion,
    KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES as DIRTY, KVM_MEM_READONLY as RO,
};
use vmmu::{AsId, Generation, Gfn};

const MIB: u64 = 1 << 20;
const GPA_BITS: u8 = 46;
const TOP: u64 = 1 << GPA_BITS;
const VA_LIMIT: u64 = (1 << 47) - 4096;
/// Metadata cap: room for the setup's bitmap (128 bytes) and small ones, not 256 MiB slots.
const META_CAP: u64 = 1024;

#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl MemslotHooks for Log {
    fn flush_slot(&self, old: &Memslot) {
        self.0.lock().unwrap().push(format!("flush {}:{}", old.as_id().0, old.id().0));
    }
    fn memslots_updated(&self, as_id: AsId, new_gen: Generation) {
        self.0.lock().unwrap().push(format!("updated {}:{}", as_id.0, new_gen.raw()));
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Env {
    /// The setup below, 64-bit host.
    Std,
    /// The setup plus a 2^31-1 page slot, on a 32-bit host (total pages fit a u32).
    Host32,
}

fn r(as_id: u32, id: u32, flags: u32, gpa: u64, size: u64, hva: u64) -> UserspaceMemoryRegion {
    UserspaceMemoryRegion {
        slot: (as_id << 16) | id,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    }
}

/// The slots every row starts from.
fn setup(env: Env) -> Memslots {
    let max_total_pages = match env {
        Env::Std => u64::MAX,
        Env::Host32 => u32::MAX as u64,
    };
    let m = Memslots::new(MemslotsConfig {
        nr_address_spaces: 2,
        max_gpa_bits: GPA_BITS,
        user_va_limit: VA_LIMIT,
        max_readers: 8,
        metadata_limit: Some(META_CAP),
        max_total_pages,
        ..Default::default()
    });
    let hooks = Log::default();
    let base = [
        r(0, 0, 0, 0, 2 * MIB, 0x1000_0000),
        r(0, 1, DIRTY, 4 * MIB, 2 * MIB, 0x2000_0000),
        r(0, 2, RO, 8 * MIB, 2 * MIB, 0x3000_0000),
        r(0, 3, 0, TOP - 2 * MIB, 2 * MIB, 0x4000_0000),
        r(0, 4, 0, 1 << 30, 256 * MIB, 0x5000_0000),
        r(1, 0, 0, 0, 2 * MIB, 0x1000_0000),
    ];
    for x in base {
        m.set_memory_region(&x, &hooks).unwrap();
    }
    if env == Env::Host32 {
        m.set_memory_region(&r(1, 9, 0, 1 << 40, ((1 << 31) - 1) << 12, 0), &hooks).unwrap();
    }
    m
}

/// What a row expects: a change, or the rule broken and its errno.
#[derive(Clone, Copy, Debug)]
enum Want {
    Ok(MemslotChange),
    Err(&'static str, &'static str),
}
use Want::{Err as E, Ok as K};

struct Row {
    name: &'static str,
    env: Env,
    req: UserspaceMemoryRegion,
    want: Want,
}

fn row(name: &'static str, req: UserspaceMemoryRegion, want: Want) -> Row {
    Row { name, env: Env::Std, req, want }
}

fn rows() -> Vec<Row> {
    use MemslotChange::*;
    let einval = |rule| E(rule, "EINVAL");
    vec![
        // Successful requests.
        row("create in a hole", r(0, 5, 0, 16 * MIB, 2 * MIB, 0x6000_0000), K(Create)),
        row("delete", r(0, 0, 0, 0, 0, 0), K(Delete)),
        row("move", r(0, 0, 0, 32 * MIB, 2 * MIB, 0x1000_0000), K(Move)),
        row(
            "flags-only: start dirty logging",
            r(0, 0, DIRTY, 0, 2 * MIB, 0x1000_0000),
            K(FlagsOnly),
        ),
        row(
            "flags-only: stop dirty logging",
            r(0, 1, 0, 4 * MIB, 2 * MIB, 0x2000_0000),
            K(FlagsOnly),
        ),
        row("identical re-set is a no-op", r(0, 1, DIRTY, 4 * MIB, 2 * MIB, 0x2000_0000), K(NoOp)),
        row(
            "read-only + dirty logging together",
            r(0, 5, RO | DIRTY, 16 * MIB, 4096, 0x6000_0000),
            K(Create),
        ),
        row("overlap across address spaces is allowed", r(1, 5, 0, 4 * MIB, 2 * MIB, 0), K(Create)),
        row("highest user slot id 32763", r(0, 32763, 0, 16 * MIB, 4096, 0), K(Create)),
        row("slot ending at the max gfn", r(1, 6, 0, TOP - 4096, 4096, 0), K(Create)),
        row(
            "host range ending at the user limit",
            r(0, 5, 0, 16 * MIB, 8192, VA_LIMIT - 8192),
            K(Create),
        ),
        row("delete ignores flags/gpa but not hva range", r(0, 2, 0, 0x1000, 0, 0), K(Delete)),
        // Rule 1: flags (checked by the ioctl, before the slot id).
        row(
            "GUEST_MEMFD with the v1 ioctl",
            r(0, 5, KVM_MEM_GUEST_MEMFD, 16 * MIB, 4096, 0),
            einval("invalid-flags"),
        ),
        row("flag bit 31", r(0, 5, 1 << 31, 16 * MIB, 4096, 0), einval("invalid-flags")),
        row(
            "bad flags and bad slot id: flags first",
            r(0, 32764, 1 << 2, 0, 4096, 0),
            einval("invalid-flags"),
        ),
        // Rule 0: slot id.
        row(
            "slot id 32764 (internal)",
            r(0, 32764, 0, 16 * MIB, 4096, 0),
            einval("slot-id-not-user"),
        ),
        row(
            "slot id 65535 in AS 1",
            r(1, 0xffff, 0, 16 * MIB, 4096, 0),
            einval("slot-id-not-user"),
        ),
        row(
            "bad slot id and unaligned size: id first",
            r(0, 40000, 0, 16 * MIB, 1, 0),
            einval("slot-id-not-user"),
        ),
        row(
            "bad slot id and bad AS: id first",
            r(7, 32766, 0, 0, 4096, 0),
            einval("slot-id-not-user"),
        ),
        // Rules 2-4: alignment and access_ok.
        row("size not page aligned", r(0, 5, 0, 16 * MIB, 4097, 0), einval("size-not-aligned")),
        row(
            "size and gpa unaligned: size first",
            r(0, 5, 0, 16 * MIB + 1, 4097, 0),
            einval("size-not-aligned"),
        ),
        row("gpa not page aligned", r(0, 5, 0, 16 * MIB + 8, 4096, 0), einval("gpa-not-aligned")),
        row(
            "gpa and hva unaligned: gpa first",
            r(0, 5, 0, 16 * MIB + 8, 4096, 3),
            einval("gpa-not-aligned"),
        ),
        row("hva not page aligned", r(0, 5, 0, 16 * MIB, 4096, 0x1234), einval("hva-not-aligned")),
        row(
            "host range past the user limit",
            r(0, 5, 0, 16 * MIB, 8192, VA_LIMIT - 4096),
            einval("hva-range-not-user"),
        ),
        row(
            "delete with a bad host range",
            r(0, 0, 0, 0, 0, VA_LIMIT + 4096),
            einval("hva-range-not-user"),
        ),
        row(
            "unaligned hva and bad AS: hva first",
            r(2, 5, 0, 0, 4096, 0x10),
            einval("hva-not-aligned"),
        ),
        // Rule 5: address space.
        row("address space 2 of 2", r(2, 5, 0, 16 * MIB, 4096, 0), einval("no-such-address-space")),
        row(
            "bad AS and wrapping gpa: AS first",
            r(2, 5, 0, u64::MAX - 4095, 8192, 0),
            einval("no-such-address-space"),
        ),
        // Rules 6-7: range.
        row("gpa + size wraps", r(0, 5, 0, u64::MAX - 4095, 8192, 0), einval("gpa-range-wraps")),
        row("2^31 pages", r(0, 5, 0, 0x100 * (1 << 40), 1 << 43, 0), einval("too-many-pages")),
        row(
            "wraps and too many pages: wrap first",
            r(0, 5, 0, u64::MAX - 4095, 1 << 43, 0),
            einval("gpa-range-wraps"),
        ),
        // Rule 8: delete of a missing slot.
        row("delete a missing slot", r(0, 7, 0, 0, 0, 0), einval("delete-missing-slot")),
        row(
            "delete a slot that exists only in the other AS",
            r(1, 1, 0, 0, 0, 0),
            einval("delete-missing-slot"),
        ),
        // Rule 9: total pages (32-bit host).
        Row {
            name: "total pages overflow",
            env: Env::Host32,
            req: r(0, 5, 0, 1 << 44, ((1 << 31) - 1) << 12, 0),
            want: einval("total-pages-overflow"),
        },
        Row {
            name: "total overflow and overlap: total first",
            env: Env::Host32,
            req: r(1, 5, 0, 1 << 40, ((1 << 31) - 1) << 12, 0),
            want: einval("total-pages-overflow"),
        },
        // Rule 10: fixed fields of an existing slot.
        row(
            "modify: different hva",
            r(0, 0, 0, 0, 2 * MIB, 0x1100_0000),
            einval("fixed-field-changed"),
        ),
        row(
            "modify: different size",
            r(0, 0, 0, 0, 4 * MIB, 0x1000_0000),
            einval("fixed-field-changed"),
        ),
        row(
            "modify: READONLY toggled",
            r(0, 2, 0, 8 * MIB, 2 * MIB, 0x3000_0000),
            einval("fixed-field-changed"),
        ),
        row(
            "modify: hva changed and moved onto a slot",
            r(0, 0, 0, 4 * MIB, 2 * MIB, 0x1100_0000),
            einval("fixed-field-changed"),
        ),
        // Rule 11: overlap.
        row("create over an existing slot", r(0, 5, 0, MIB, 2 * MIB, 0), E("overlap", "EEXIST")),
        row(
            "move onto another slot",
            r(0, 0, 0, 5 * MIB, 2 * MIB, 0x1000_0000),
            E("overlap", "EEXIST"),
        ),
        row(
            "move overlapping and past the max gfn: overlap first",
            r(0, 0, 0, TOP - MIB, 2 * MIB, 0x1000_0000),
            E("overlap", "EEXIST"),
        ),
        row(
            "create overlapping and past the max gfn: overlap first",
            r(0, 5, 0, TOP - MIB, 2 * MIB, 0),
            E("overlap", "EEXIST"),
        ),
        // Rule 12: max gfn.
        row("create past the max gfn", r(0, 5, 0, TOP, 4096, 0), einval("beyond-max-gfn")),
        row(
            "create straddling the max gfn",
            r(1, 5, 0, TOP - 4096, 8192, 0),
            einval("beyond-max-gfn"),
        ),
        row(
            "move past the max gfn (reverted)",
            r(0, 0, 0, 2 * TOP, 2 * MIB, 0x1000_0000),
            einval("beyond-max-gfn"),
        ),
        // Rule 13: allocation.
        row(
            "dirty bitmap over the metadata cap",
            r(0, 5, DIRTY, 2 << 30, 256 * MIB, 0),
            E("out-of-memory", "ENOMEM"),
        ),
        row(
            "flags-only enabling a too large bitmap",
            r(0, 4, DIRTY, 1 << 30, 256 * MIB, 0x5000_0000),
            E("out-of-memory", "ENOMEM"),
        ),
        row(
            "bitmap before max gfn: ENOMEM first",
            r(0, 5, DIRTY, TOP, 256 * MIB, 0),
            E("out-of-memory", "ENOMEM"),
        ),
    ]
}

/// Everything observable about the slots: per AS, (id, base, npages, flags) by gfn.
fn snapshot(m: &Memslots) -> Vec<Vec<(u16, u64, u64, u32)>> {
    let reader = m.register_reader().unwrap_or_else(|_| panic!("one reader per snapshot"));
    let g = m.read(&reader);
    (0..m.nr_address_spaces())
        .map(|a| {
            g.set(AsId(a))
                .iter()
                .map(|s| (s.id().0, s.base_gfn().0, s.npages(), s.flags()))
                .collect()
        })
        .collect()
}

#[test]
fn errno_table() {
    let rows = rows();
    assert!(rows.len() >= 25);
    let mut failures = Vec::new();
    for row in &rows {
        let m = setup(row.env);
        let before_gens: Vec<u64> = (0..2).map(|a| m.generation(AsId(a)).raw()).collect();
        let before_meta = m.metadata_bytes();
        let hooks = Log::default();
        let got = m.set_memory_region(&row.req, &hooks);
        let ok = match (row.want, &got) {
            (Want::Ok(c), Ok(g)) => c == *g,
            (Want::Err(rule, errno), Err(e)) => e.rule() == rule && e.errno() == errno,
            _ => false,
        };
        if !ok {
            failures.push(format!("{}: want {:?}, got {:?}", row.name, row.want, got));
            continue;
        }
        if let Err(e) = got {
            assert!(!e.to_string().is_empty());
            let log = hooks.0.lock().unwrap().clone();
            let gens: Vec<u64> = (0..2).map(|a| m.generation(AsId(a)).raw()).collect();
            if row.name.contains("reverted") {
                // KVM: invalidate (swap + flush), prepare fails, swap the old slot back.
                assert_eq!(log, ["updated 0:12", "flush 0:0", "updated 0:14"], "{}", row.name);
                assert_eq!(gens, [before_gens[0] + 4, before_gens[1]]);
                let reader = m.register_reader().unwrap();
                let g = m.read(&reader);
                let s = g.set(AsId(0)).find(Gfn(0)).copied().unwrap();
                assert!(!s.is_invalid(), "the old slot is valid again");
            } else {
                assert!(log.is_empty(), "{}: a rejected request ran hooks: {log:?}", row.name);
                assert_eq!(gens, before_gens, "{}: generation changed", row.name);
            }
            assert_eq!(snapshot(&m), snapshot(&setup(row.env)), "{}: slots changed", row.name);
            assert_eq!(m.metadata_bytes(), before_meta, "{}: metadata leaked", row.name);
        }
    }
    assert!(failures.is_empty(), "{} rows failed:\n{}", failures.len(), failures.join("\n"));
}
