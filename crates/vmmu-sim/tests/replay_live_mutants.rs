//! The replay's index of live slots (`src/replay/live.rs`) where mutation testing (audit 42m,
//! `cargo mutants` on that file against its unit tests) found it unpinned: each test replays a
//! small synthetic trace and checks what the replay reports (an oracle verdict, a dirty-log
//! figure), and names the mutant it kills.

use vmmu::spte::FormatKind;
use vmmu_sim::replay::{parse, replay, ReplayConfig, RunReport};

/// Replays the trace made of `events` (JSON lines without the header) on the TDP MMU (EPT,
/// MMIO caching on).
fn run(events: &[&str]) -> RunReport {
    let mut text = String::from("{\"vmmu_trace\":1,\"source\":\"synthetic (audit 42m)\"}\n");
    for (i, e) in events.iter().enumerate() {
        text.push_str(&format!("{{\"t\":0.{i:06},{e}}}\n"));
    }
    let trace = parse(&text).expect("the trace parses");
    replay(&trace, &ReplayConfig::new(FormatKind::Ept, true)).expect("replay runs")
}

/// A slot deleted, then a new slot whose range covers the deleted slot's start: the replay's
/// own probes of the new slot (first, middle and last page; the middle one is the old start)
/// must find it, and read RAM there. With the deleted slot left in the index by gpa, the lookup
/// stopped at the old start, found no live slot, and reported the core's correct RAM read as a
/// violation ("read where no slot is": a clean trace failed).
/// Kills `replay/live.rs:66:18` (`key.0 == 0` -> `!=` in `LiveSlots::delete`).
#[test]
fn a_slot_over_a_deleted_slots_start_is_found_by_the_replay() {
    let r = run(&[
        r#""op":"slot","as":0,"id":0,"flags":[],"gpa":"0x0","size":"0xa0000","uaddr":"0x7f0000000000""#,
        r#""op":"slot","as":0,"id":1,"flags":[],"gpa":"0x100000","size":"0x1000","uaddr":"0x7f0000100000""#,
        r#""op":"slot","as":0,"id":1,"flags":[],"gpa":"0x100000","size":"0x0","uaddr":"0x7f0000100000""#,
        r#""op":"slot","as":0,"id":2,"flags":[],"gpa":"0xf0000","size":"0x20000","uaddr":"0x7f0000200000""#,
    ]);
    assert_eq!((r.slots.creates, r.slots.deletes), (3, 1));
    assert!(r.passed(), "{:?}", r.oracle.first_violations);
    assert!(r.own_accesses.reads > 0);
}

/// A flags-only change that starts dirty logging: the GET that follows is on a logged slot, as
/// the report's `dirty_log.on_logged_slot` says. Kills `replay/live.rs:90:9`
/// (`LiveSlots::set_dirty_log` -> `()`: the figure stayed 0, as if the VMM had asked for the log
/// of a slot that does not log).
#[test]
fn a_flags_only_change_to_dirty_logging_is_seen_by_the_replay() {
    let r = run(&[
        r#""op":"slot","as":0,"id":0,"flags":[],"gpa":"0x0","size":"0x10000","uaddr":"0x7f0000000000""#,
        r#""op":"slot","as":0,"id":0,"flags":["dirty_log"],"gpa":"0x0","size":"0x10000","uaddr":"0x7f0000000000""#,
        r#""op":"get-dirty-log","as":0,"id":0"#,
    ]);
    assert!(r.passed(), "{r:?}");
    assert_eq!(r.slots.flags_only, 1);
    assert_eq!((r.dirty_log.get, r.dirty_log.on_logged_slot), (1, 1));
}
