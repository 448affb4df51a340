//! Every historical bug (`vmmu::bugs::Bug`) is caught (issue 7 point 3, issue 11 points 4-5).
//!
//! With `--features historical-bugs` this RUNS the check of every entry of `Bug::ALL`
//! (`tests/catchers/mod.rs`, `catcher`; a bug without one does not compile) twice: with no bug,
//! where it must see nothing wrong, and with just that bug, where it must report what went wrong.
//! A check is either a catcher (a guest access saw something wrong: gpa, expected, seen) or, for
//! the two bugs that cannot cause harm in this design, an invariant test; their docs in
//! `src/bugs.rs` must say why ("No harm in this design").
//!
//! The concurrency models that catch the same bugs under every interleaving loom explores
//! (`tests/loom_*.rs`) run in the loom pass of `scripts/test`; the machine's oracle catches them
//! end to end (`crates/vmmu-sim/tests/oracle_bugs.rs`, `crates/vmmu-cli/tests/run_cmd.rs`).
#![cfg(not(loom))] // std threads and atomics: loom types only work inside a model

#[cfg(feature = "historical-bugs")]
mod catchers;
#[cfg(feature = "historical-bugs")]
mod common;

use vmmu::bugs::Bug;

#[cfg(feature = "historical-bugs")]
#[test]
fn every_bug_is_caught_by_running_its_check_with_and_without_it() {
    use catchers::{catcher, Catcher};
    use vmmu::bugs::BugSet;
    let mut failures = Vec::new();
    for bug in Bug::ALL {
        let (without, with) = match catcher(bug) {
            Catcher::Harm(f) => (
                f(BugSet::NONE).map(|h| h.to_string()),
                f(BugSet::only(bug)).map(|h| h.to_string()),
            ),
            Catcher::Invariant(f) => (
                f(BugSet::NONE).map(|b| b.to_string()),
                f(BugSet::only(bug)).map(|b| b.to_string()),
            ),
        };
        match (without, with) {
            (None, Some(seen)) => eprintln!("{bug}: caught: {seen}"),
            (Some(seen), _) => failures.push(format!("{bug}: wrong without the bug: {seen}")),
            (None, None) => failures.push(format!("{bug}: not caught: the check saw nothing")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The bugs checked by an invariant test must say in `src/bugs.rs` why they cannot cause harm;
/// the others must not claim it.
#[cfg(feature = "historical-bugs")]
#[test]
fn invariant_only_bugs_document_why_they_cause_no_harm() {
    use catchers::{catcher, Catcher};
    // The doc comment of each variant: the `///` lines just above `Name = n,`.
    let mut docs = std::collections::HashMap::new();
    let mut doc = String::new();
    for line in include_str!("../src/bugs.rs").lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("///") {
            doc.push_str(text.trim());
            doc.push(' ');
        } else {
            if let Some((name, _)) = line.split_once(" = ") {
                docs.insert(name.to_string(), std::mem::take(&mut doc));
            }
            doc.clear();
        }
    }
    for bug in Bug::ALL {
        let doc = docs.get(&format!("{bug:?}")).unwrap_or_else(|| panic!("no variant {bug:?}"));
        let claims = doc.contains("No harm in this design");
        let invariant = matches!(catcher(bug), Catcher::Invariant(_));
        assert_eq!(
            claims, invariant,
            "{bug}: doc says no harm: {claims}, checked by an invariant test: {invariant}"
        );
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
