//! Inputs a user or a recorder can hand us, damaged: the committed scenario files and recorded
//! traces, with values replaced by edge cases (0, all ones, 2^63, past u64, negative, empty,
//! not a number), keys and lines dropped, duplicated or swapped, and lines cut short. Every
//! mutant must either be refused with an error or run to an end (observations, a report) on
//! the software machine: a panic anywhere, in the parser, the scenario driver, the machine, the
//! replay or the MMU below them, fails the test, and proptest prints the shrunk input.
//!
//! `VMMU_MUTATION_CASES` sets the number of cases per input kind (default 256: a few seconds).
//! The mutants come from a fixed seed, so a run in CI is repeatable; `VMMU_MUTATION_SEED=N`
//! picks other ones (`random`: a new seed each run, for a longer search by hand).

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use std::cell::Cell;
use std::path::PathBuf;
use vmmu::spte::FormatKind;
use vmmu_scenario::run_collect;
use vmmu_sim::replay::{parse as parse_trace, replay, ReplayConfig};
use vmmu_sim::SimBackend;

/// Values that break careless arithmetic or parsing.
const EDGE_VALUES: &[&str] = &[
    "0",
    "1",
    "0x0",
    "0x1",
    "0xfff",
    "0x1000",
    "0xfffff000",
    "0x1000000000",
    "0x7fffffffffffffff",
    "0x8000000000000000",
    "0xffffffffffffffff",
    "0x10000000000000000",
    "18446744073709551615",
    "18446744073709551616",
    "4294967295",
    "4294967296",
    "65535",
    "65536",
    "32767",
    "-1",
    "",
    "0x",
    "x",
    "1e3",
    "9.5",
];

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

/// One damage to a file of lines; the numbers pick lines, tokens and values (taken modulo).
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the value of a token (`key=value`, or a JSON field) by an edge value.
    Value {
        line: usize,
        token: usize,
        value: usize,
    },
    /// Drop a token or a JSON field.
    DropToken {
        line: usize,
        token: usize,
    },
    DropLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    /// Cut a line at a byte (on a char boundary).
    Truncate {
        line: usize,
        at: usize,
    },
}

/// A mutation; `value_weight` weighs value replacements against the other kinds (each 1).
fn mutation(value_weight: u32) -> impl Strategy<Value = Mutation> {
    let n = || 0usize..10_000;
    prop_oneof![
        value_weight => (n(), n(), n()).prop_map(|(line, token, value)| Mutation::Value { line, token, value }),
        1 => (n(), n()).prop_map(|(line, token)| Mutation::DropToken { line, token }),
        1 => n().prop_map(Mutation::DropLine),
        1 => n().prop_map(Mutation::DuplicateLine),
        1 => (n(), n()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        1 => (n(), n()).prop_map(|(line, at)| Mutation::Truncate { line, at }),
    ]
}

/// A scenario line's tokens: whitespace-separated; a value is what follows `=`.
fn mutate_scenario_line(line: &str, m: &Mutation) -> String {
    let mut tokens: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    if tokens.is_empty() {
        return line.to_string();
    }
    match *m {
        Mutation::Value { token, value, .. } => {
            let i = token % tokens.len();
            let v = EDGE_VALUES[value % EDGE_VALUES.len()];
            tokens[i] = match tokens[i].split_once('=') {
                Some((k, _)) => format!("{k}={v}"),
                None => v.to_string(),
            };
        }
        Mutation::DropToken { token, .. } => {
            tokens.remove(token % tokens.len());
        }
        _ => {}
    }
    tokens.join(" ")
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

fn apply(lines: &mut Vec<String>, m: &Mutation, line_fn: fn(&str, &Mutation) -> String) {
    if lines.is_empty() {
        return;
    }
    let n = lines.len();
    match *m {
        Mutation::Value { line, .. } | Mutation::DropToken { line, .. } => {
            lines[line % n] = line_fn(&lines[line % n], m);
        }
        Mutation::DropLine(i) => {
            lines.remove(i % n);
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i % n].clone();
            lines.insert(i % n, l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a % n, b % n),
        Mutation::Truncate { line, at } => {
            let l = &mut lines[line % n];
            let mut cut = at % (l.len() + 1);
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
        }
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
            let mut lines: Vec<String> = files[file].1.lines().map(str::to_string).collect();
            for m in &muts {
                apply(&mut lines, m, mutate_scenario_line);
            }
            let text = lines.join("\n") + "\n";
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
    let strategy = (0..files.len(), 0usize..3, proptest::collection::vec(mutation(20), 1..4));
    let configs = [
        ReplayConfig::new(FormatKind::Ept, true),
        ReplayConfig::new(FormatKind::Npt, false),
        ReplayConfig { phys_bits: 52, ..ReplayConfig::new(FormatKind::Ept, true) },
    ];
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
