//! Inputs a user or a recorder can hand us, damaged (`vmmu_scenario::mutate`): the committed
//! scenario files and recorded traces, with values replaced by edge cases (0, all ones, 2^63,
//! past u64, negative, empty, not a number), keys (scenario words, trace fields) dropped, and
//! lines dropped, duplicated, swapped or cut short. Every
//! mutant must either be refused with an error or run to an end (observations, a report) on
//! the software machine: a panic anywhere, in the parser, the scenario driver, the machine, the
//! replay or the MMU below them, fails the test, and proptest prints the shrunk input.
//!
//! `VMMU_MUTATION_CASES` sets the number of cases per input kind (default 256: a few seconds).
//! The mutants come from a fixed seed, so a run in CI is repeatable; `VMMU_MUTATION_SEED=N`
//! picks other ones (`random`: a new seed each run, for a longer search by hand).

use proptest::test_runner::{Config, RngSeed, TestRunner};
use std::cell::Cell;
use std::path::PathBuf;
use vmmu::spte::FormatKind;
use vmmu_scenario::mutate::{apply, damaged_scenario, mutation, Mutation, EDGE_VALUES};
use vmmu_scenario::run_collect;
use vmmu_sim::replay::{parse as parse_trace, replay, ReplayConfig};
use vmmu_sim::SimBackend;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn cases() -> u32 {
    match std::env::var("VMMU_MUTATION_CASES") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("VMMU_MUTATION_CASES={v} is not a number")),
        Err(_) => 256,
    }
}

fn seed() -> RngSeed {
    match std::env::var("VMMU_MUTATION_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(v) => RngSeed::Fixed(
            v.parse().unwrap_or_else(|_| panic!("VMMU_MUTATION_SEED={v} is not a number")),
        ),
        Err(_) => RngSeed::Fixed(0x766d_6d75),
    }
}

/// The committed files of `dir` ending in `suffix`, as (name, text).
fn corpus(dir: &str, suffix: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(repo(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), text)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {suffix} files in {dir}");
    files
}

/// The top-level fields of a one-line JSON object, as (key start, value start, value end) byte
/// offsets: the key's opening quote, and the value's span. Text-level, so the field order (which
/// the trace format fixes) is kept.
fn json_fields(line: &str) -> Vec<(usize, usize, usize)> {
    let mut fields = Vec::new();
    let (mut depth, mut in_str, mut escaped) = (0u32, false, false);
    let (mut key_start, mut value_start) = (None, None);
    for (i, c) in line.char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                if depth == 1 && key_start.is_none() {
                    key_start = Some(i);
                }
                in_str = true;
            }
            ':' if depth == 1 && value_start.is_none() => value_start = Some(i + 1),
            '{' | '[' => depth += 1,
            ',' | '}' | ']' => {
                if depth == 1 && c != ']' {
                    if let (Some(k), Some(v)) = (key_start, value_start) {
                        fields.push((k, v, i));
                    }
                    key_start = None;
                    value_start = None;
                }
                depth = depth.saturating_sub(u32::from(c != ','));
            }
            _ => {}
        }
    }
    fields
}

/// A trace line is one JSON object: replace a field's value by an edge value (a hex field by a
/// hex string, a number by a number, else either), or drop the field.
fn mutate_trace_line(line: &str, m: &Mutation) -> String {
    let fields = json_fields(line);
    if fields.is_empty() {
        return line.to_string();
    }
    match *m {
        Mutation::Value { token, value, .. } => {
            let (_, vs, ve) = fields[token % fields.len()];
            let old = &line[vs..ve];
            let v = EDGE_VALUES[value % EDGE_VALUES.len()];
            let hex = EDGE_VALUES.iter().filter(|e| e.starts_with("0x")).collect::<Vec<_>>();
            let new = if old.starts_with("\"0x") {
                format!("\"{}\"", hex[value % hex.len()])
            } else if old.starts_with(|c: char| c.is_ascii_digit()) || value % 2 == 1 {
                v.to_string()
            } else {
                format!("\"{v}\"")
            };
            format!("{}{new}{}", &line[..vs], &line[ve..])
        }
        Mutation::DropToken { token, .. } => {
            let i = token % fields.len();
            let (ks, _, ve) = fields[i];
            // The field and the comma before it (or after it, for the first field).
            let (from, to) =
                if i > 0 { (fields[i - 1].2, ve) } else { (ks, (ve + 1).min(line.len())) };
            format!("{}{}", &line[..from], &line[to..])
        }
        _ => line.to_string(),
    }
}

/// How many mutants parsed, and how many of those ran to the end without an error: a test where
/// no mutant gets past the parser would only test the parser.
#[derive(Default)]
struct Reach {
    cases: Cell<u32>,
    parsed: Cell<u32>,
    ran: Cell<u32>,
}

impl Reach {
    /// `min_parsed`: the share of mutants that must parse, in percent.
    fn check(&self, what: &str, min_parsed: u32) {
        let (c, p, r) = (self.cases.get(), self.parsed.get(), self.ran.get());
        eprintln!("{what}: {c} mutants, {p} parsed, {r} ran without an error");
        assert!(
            p * 100 >= c * min_parsed,
            "{what}: only {p} of {c} mutants parsed; the mutations are too rough"
        );
        assert!(r > 0, "{what}: no mutant ran without an error");
    }
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        rng_seed: seed(),
        ..Config::default()
    })
}

#[test]
fn damaged_scenarios_are_refused_or_run_without_panicking() {
    let files = corpus("tests/scenarios", ".scn");
    let strategy = (0..files.len(), proptest::collection::vec(mutation(4), 1..6));
    let reach = Reach::default();
    runner()
        .run(&strategy, |(file, muts)| {
            let text = damaged_scenario(&files[file].1, &muts);
            reach.cases.set(reach.cases.get() + 1);
            if let Ok(scenario) = vmmu_scenario::parse(&text) {
                reach.parsed.set(reach.parsed.get() + 1);
                // Refusals (`Err`) are fine; only a panic fails.
                if run_collect(&SimBackend, &scenario).is_ok() {
                    reach.ran.set(reach.ran.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    reach.check("scenarios", 10);
}

#[test]
fn damaged_traces_are_refused_or_replay_without_panicking() {
    let files = corpus("tests/traces", ".trace.jsonl");
    // A trace's summary counts its events: most line-level damage is refused at the end, so
    // values are mostly what changes.
    let configs = [
        ReplayConfig::new(FormatKind::Ept, true),
        ReplayConfig::new(FormatKind::Npt, false),
        ReplayConfig { phys_bits: 52, ..ReplayConfig::new(FormatKind::Ept, true) },
        // The shadow MMU's own guest (no paging below 4 GiB, identity tables above) meets the
        // damaged addresses too.
        ReplayConfig::shadow(true),
        ReplayConfig { phys_bits: 52, ..ReplayConfig::shadow(false) },
    ];
    let strategy =
        (0..files.len(), 0..configs.len(), proptest::collection::vec(mutation(20), 1..4));
    let reach = Reach::default();
    runner()
        .run(&strategy, |(file, config, muts)| {
            let mut lines: Vec<String> = files[file].1.lines().map(str::to_string).collect();
            for m in &muts {
                apply(&mut lines, m, mutate_trace_line);
            }
            let text = lines.join("\n") + "\n";
            reach.cases.set(reach.cases.get() + 1);
            if let Ok(trace) = parse_trace(&text) {
                reach.parsed.set(reach.parsed.get() + 1);
                let cfg = &configs[config];
                if replay(&trace, cfg).is_ok() {
                    reach.ran.set(reach.ran.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    reach.check("traces", 2);
}
