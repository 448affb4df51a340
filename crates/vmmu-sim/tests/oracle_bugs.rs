//! Historical bugs caught by the machine's oracle (issue 7, point 3): the default machine on the
//! real MMU with one bug re-injected must report violations; the same run without it is clean
//! (`tests/real_mmu.rs`). The loom models and named core tests that catch every bug are listed in
//! `crates/vmmu/tests/bugs_caught.rs`; these are the end-to-end catches, what
//! `vmmu run --inject NAME` shows.
#![cfg(feature = "historical-bugs")]

mod common;

use std::time::Duration;
use vmmu::bugs::{Bug, BugSet};
use vmmu::spte::FormatKind;

fn violations(bug: Bug, format: FormatKind) -> u64 {
    let report =
        common::run_real(format, true, BugSet::only(bug), 3, Duration::from_millis(1500), 40);
    report.oracle.violations + report.vcpus.iter().map(|v| v.errors).sum::<u64>()
}

#[test]
fn oracle_catches_mmio_spte_ignores_gen() {
    for f in [FormatKind::Ept, FormatKind::Npt] {
        assert!(
            violations(Bug::MmioSpteIgnoresGen, f) > 0,
            "{f:?}: a stale MMIO SPTE hit went unseen"
        );
    }
}

#[test]
fn oracle_catches_no_tlb_flush_on_zap() {
    assert!(violations(Bug::NoTlbFlushOnZap, FormatKind::Ept) > 0, "a stale TLB entry went unseen");
}
