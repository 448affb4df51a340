//! Which test catches which historical bug (`vmmu::bugs::Bug`, issue 7 point 3).
//!
//! Every bug must have at least one catching test: a test that runs a scenario with the bug
//! switched on (`--features historical-bugs`) and asserts that the checker reports the wrong
//! behaviour, next to a test that runs the same scenario without the bug and asserts the property
//! holds. Adding a bug to `Bug::ALL` without a row here fails this test, and so does a row naming
//! a test function that does not exist.
//!
//! Where they run: loom models (`tests/loom_*.rs`) in the loom pass of `scripts/test`, which
//! builds with `--features historical-bugs`; the others in `cargo test --workspace
//! --all-features`. End-to-end catches by the machine's oracle (`vmmu run --inject`) are in
//! `crates/vmmu-sim/tests/oracle_bugs.rs` and `crates/vmmu-cli/tests/run_cmd.rs`.

use std::path::Path;
use vmmu::bugs::Bug;

/// `(bug, [(file relative to crates/vmmu, test function)])`.
const CATCHERS: &[(Bug, &[(&str, &str)])] = &[
    (
        Bug::NoSecondIncrement,
        &[
            ("tests/loom_memslot.rs", "create_model_catches_no_second_increment"),
            ("tests/loom_mmu.rs", "wrap_hook_vs_prewrap_spte_catches_no_second_increment"),
        ],
    ),
    (
        Bug::CacheWhileInProgress,
        &[("tests/loom_mmu.rs", "cache_fill_during_update_catches_cache_while_in_progress")],
    ),
    (
        Bug::VcpuCacheWithoutGen,
        &[
            ("tests/loom_mmu.rs", "create_over_mmio_catches_vcpu_cache_without_gen"),
            (
                "tests/tdp_faults.rs",
                "access_after_create_over_cached_mmio_catches_missing_generation_checks",
            ),
        ],
    ),
    (
        Bug::WrapHookAfterPublish,
        &[("tests/loom_mmu.rs", "wrap_hook_vs_prewrap_spte_catches_wrap_hook_after_publish")],
    ),
    (Bug::StickyCachingDisable, &[("src/spte/policy.rs", "sticky_caching_disable_is_caught")]),
    (
        Bug::ZappedSpteIsMisconfig,
        &[("tests/loom_mmu.rs", "walk_vs_zap_catches_zapped_spte_is_misconfig")],
    ),
    (
        Bug::NoStaleRootCheck,
        &[("tests/loom_mmu.rs", "fault_vs_zap_all_fast_catches_no_stale_root_check")],
    ),
    (
        Bug::InvalidSlotAsMmio,
        &[("tests/tdp_faults.rs", "fault_on_a_slot_being_deleted_catches_invalid_slot_as_mmio")],
    ),
    (
        Bug::MmioSpteIgnoresGen,
        &[
            ("tests/loom_mmu.rs", "create_over_mmio_catches_mmio_spte_ignores_gen"),
            (
                "tests/tdp_faults.rs",
                "access_after_create_over_cached_mmio_catches_missing_generation_checks",
            ),
        ],
    ),
    (
        Bug::NoTlbFlushOnZap,
        &[
            ("tests/loom_tlb_flush.rs", "loom_tlb_flush_catches_no_tlb_flush_on_zap"),
            ("tests/tdp_races.rs", "race_catches_no_tlb_flush_on_zap"),
        ],
    ),
];

#[test]
fn every_bug_has_a_catching_test() {
    let missing: Vec<Bug> = Bug::ALL
        .into_iter()
        .filter(|b| !CATCHERS.iter().any(|(c, t)| c == b && !t.is_empty()))
        .collect();
    assert!(missing.is_empty(), "bugs without a catching test: {missing:?}");
    for (i, (b, _)) in CATCHERS.iter().enumerate() {
        assert!(!CATCHERS[..i].iter().any(|(c, _)| c == b), "{b} listed twice");
    }
}

/// Each named catcher exists, is compiled only with `historical-bugs`, and lives in a file
/// that also holds a bug-free run of the same scenario (a test named `*_holds`, `*_retries`,
/// `*_reaches_ram`, ... is not checked by name; the catcher must be gated by the feature).
#[test]
fn every_named_catcher_exists_and_is_feature_gated() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (bug, tests) in CATCHERS {
        for (file, name) in tests.iter() {
            let src = std::fs::read_to_string(root.join(file))
                .unwrap_or_else(|e| panic!("{bug}: cannot read {file}: {e}"));
            let decl = format!("fn {name}(");
            let at = src
                .find(&decl)
                .unwrap_or_else(|| panic!("{bug}: {file} has no test function {name}"));
            // The attributes just above the function (or its enclosing module) include the
            // feature gate.
            let before = &src[..at];
            let window = &before[before.len().saturating_sub(600)..];
            let gated = window.contains("feature = \"historical-bugs\"")
                || before.rfind("#[cfg(feature = \"historical-bugs\")]\nmod ").is_some();
            assert!(gated, "{bug}: {file}::{name} is not gated by the historical-bugs feature");
        }
    }
}

/// Without the feature, no bug can be switched on at all.
#[cfg(not(feature = "historical-bugs"))]
#[test]
fn bugs_compile_away_without_the_feature() {
    for b in Bug::ALL {
        assert!(!vmmu::bugs::BugSet::NONE.has(b));
    }
}
