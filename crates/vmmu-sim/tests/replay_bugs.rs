//! The replay's checks catch re-injected historical KVM bugs on real recordings: each bug below
//! makes the replay of a committed trace report oracle violations, and the same replay without it
//! is clean. Needs the `historical-bugs` feature (`cargo test -p vmmu-sim --all-features`).
//!
//! Not here: the bugs that need a race window (`invalid-slot-as-mmio`,
//! `zapped-spte-is-misconfig`), an MMIO-generation wrap (`no-second-increment`,
//! `wrap-hook-after-publish`; a boot makes about 70 generation swaps, the wrap is 2^19 away) or a
//! change of SPTE masks (`sticky-caching-disable`); the replay runs one vCPU between events and
//! cannot open those windows. `cache-while-in-progress` and `no-stale-root-check` cause no harm
//! in this design (`crates/vmmu/src/bugs.rs`).
#![cfg(feature = "historical-bugs")]

use vmmu::bugs::{Bug, BugSet};
use vmmu::spte::FormatKind;
use vmmu_sim::replay::{parse, replay, ReplayConfig, RunReport, Trace};

fn trace(name: &str) -> Trace {
    let path = format!("{}/../../tests/traces/{name}.trace.jsonl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn run(t: &Trace, cfg: ReplayConfig, bugs: BugSet) -> RunReport {
    replay(t, &ReplayConfig { bugs, ..cfg }).expect("replay runs")
}

#[test]
fn stale_translations_and_stale_mmio_are_caught_on_recorded_boots() {
    let tdp = ReplayConfig::new;
    let cases = [
        // A stale TLB entry after a delete: the old range reads RAM where no slot is.
        (Bug::NoTlbFlushOnZap, tdp(FormatKind::Ept, false)),
        (Bug::NoTlbFlushOnZap, tdp(FormatKind::Npt, true)),
        // A pre-create MMIO SPTE (or per-vCPU cache entry) still used after the slot appeared.
        (Bug::MmioSpteIgnoresGen, tdp(FormatKind::Ept, true)),
        (Bug::MmioSpteIgnoresGen, tdp(FormatKind::Npt, true)),
        (Bug::VcpuCacheWithoutGen, tdp(FormatKind::Ept, true)),
        // The same under the shadow MMU, as the recording hosts ran these boots.
        (Bug::MmioSpteIgnoresGen, ReplayConfig::shadow(true)),
        (Bug::VcpuCacheWithoutGen, ReplayConfig::shadow(true)),
    ];
    for name in [
        "hand-aliases-move-delete-rom",
        "seabios-kvm.small",
        "q35-kvm.small",
        "vga13-kvm.small",
        "barmove-kvm.small",
    ] {
        let t = trace(name);
        for (bug, cfg) in cases {
            let clean = run(&t, cfg, BugSet::NONE);
            assert!(clean.passed(), "{name} {}: {clean:?}", cfg.name());
            let r = run(&t, cfg, BugSet::only(bug));
            assert!(r.oracle.violations > 0, "{name}: {bug} ({}) went unnoticed", cfg.name());
            let first = &r.oracle.first_violations[0];
            println!("{name} {bug}: {} violations, first: {first}", r.oracle.violations);
        }
    }
}

/// On the BAR-move recording the recorded accesses themselves show a missing TLB flush: the guest
/// reads the place the BAR just left, the VMM saw an MMIO exit there, and a vCPU that kept the
/// BAR's old translation reads VRAM instead (a misclassified recorded access), besides what the
/// replay's own probes see.
#[test]
fn a_missing_tlb_flush_turns_recorded_mmio_into_ram_reads_after_a_bar_move() {
    let t = trace("barmove-kvm.small");
    let cfg = ReplayConfig::new(FormatKind::Ept, false);
    let clean = run(&t, cfg, BugSet::NONE);
    assert!(clean.passed() && clean.mmio.misclassified == 0, "{clean:?}");
    let r = run(&t, cfg, BugSet::only(Bug::NoTlbFlushOnZap));
    assert!(r.mmio.misclassified > 0, "{:?}", r.mmio);
    let first = &r.mmio.first_misclassified[0];
    let gpa = u64::from_str_radix(first.gpa.trim_start_matches("0x"), 16).unwrap();
    let bar = |base: u64| (base..base + 0x100_0000).contains(&gpa);
    assert!(bar(0xe000_0000) || bar(0xfd00_0000), "{first:?}");
    println!("{} recorded accesses misclassified, first: {first:?}", r.mmio.misclassified);
}
