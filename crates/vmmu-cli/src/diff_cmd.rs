//! `vmmu diff FILE...`: run each scenario on every source and print one verdict per file.
//!
//! The sources of a file are: the simulated machine under every format x MMIO caching on/off
//! (only the pinned format when the `vm` line pins `format=`; see [`sim_backends`]), real
//! `/dev/kvm` when it is usable, and the recorded output `NAME.jsonl` when it exists (by default
//! in `../expected/` next to the file's directory, as `tests/scenarios` and `tests/expected`
//! sit; `--expected DIR` names another directory, which must exist: a bad one is a bad
//! argument, and a NAME.jsonl missing from it is said on stderr). The verdict logic is
//! [`vmmu_scenario::diff`]'s.
//!
//! Output: one line per file on stdout (`equal  FILE (sources)`, `DIFFER FILE: step N: a: LINE |
//! b: LINE`, `FAILED FILE: source: error`, `skipped FILE: reason`). One difference is allowed and
//! said on the `equal` line: the machine's EPT and NPT configurations may report other pages in
//! `dirty-log` results when everything else agrees and a shadow configuration agrees with KVM or
//! the recording exactly (a read dirties a page when the MMU maps it writable, and a TDP MMU maps
//! per gfn, a shadow MMU per guest mapping; a file pinned to EPT or NPT gets a shadow run as the
//! witness). A second is the largest-gpa rule of `scenarios.md`: EPT and NPT configurations
//! that refused only a slot past `2^phys_bits`, and agree with the rest when run again at
//! `phys_bits=52` ([`vmmu_scenario::diff::allow_tdp_max_gpa`]). Exit status: 2 when a file
//! cannot be read or does not parse (message on stderr; the other files still run) or on bad
//! arguments, else 1 when any file differs or a source failed, else 0. `--counters` adds, under
//! each verdict, where the shadow MMU's counters part from KVM's (not part of the verdict).

use crate::stdout::note;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vmmu_scenario::diff::{self, Outcome, Source, Verdict};
use vmmu_scenario::{parse_observations, Backend, Format, VerdictLine};

/// Arguments of `vmmu diff`.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// Scenario files (format: shared/design/scenarios.md); `-` reads one from standard input.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Directory of recorded outputs NAME.jsonl [default: ../expected next to each file's
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub expected: Option<PathBuf>,
    /// Do not compare with recorded outputs.
    #[arg(long, conflicts_with = "expected")]
    pub no_expected: bool,
    /// Do not run on /dev/kvm.
    #[arg(long)]
    pub no_kvm: bool,
    /// Also run the shadow-paging configurations and /dev/kvm once more, reading the shadow MMU's
    /// counters (`mmu_cache_miss`, `mmu_shadow_zapped`, `mmu_recycled`, `mmu_flooded`) after
    /// every step, and print under the verdict the first step where each configuration's
    /// counters part from KVM's. Counters are not observations: a difference says the two MMUs
    /// built or zapped different shadow pages there, the place to look for one that shows.
    #[arg(long, conflicts_with = "no_kvm")]
    pub counters: bool,
}

/// Runs `scenario` on `backend`, keeping the counters after every step (`Err`: why it stopped).
fn counter_trail(
    backend: &dyn Backend,
    scenario: &vmmu_scenario::Scenario,
) -> Result<vmmu_scenario::CounterTrail, String> {
    vmmu_scenario::counter_trail(backend, scenario).map_err(|e| e.to_string())
}

/// The lines `--counters` prints under a verdict: for each shadow-paging configuration, the first
/// step where its counters part from KVM's.
fn counter_lines(
    scenario: &vmmu_scenario::Scenario,
    pinned: Option<Format>,
    kvm: &dyn Backend,
) -> Vec<String> {
    let reference = match counter_trail(kvm, scenario) {
        Ok(t) if t.iter().any(|(_, _, c)| c.is_some()) => t,
        // A skipped scenario runs no step.
        Ok(t) if t.is_empty() => return vec!["  counters: kvm ran no step".into()],
        Ok(_) => return vec!["  counters: kvm gives none (no KVM_GET_STATS_FD)".into()],
        Err(e) => return vec![format!("  counters: kvm: {e}")],
    };
    let mut lines = Vec::new();
    let shadow = |n: &str| diff::machine_source_format(n) == Some(Format::Shadow);
    for (name, b) in sim_backends(pinned).iter().filter(|(n, _)| shadow(n)) {
        let line = match counter_trail(b.as_ref(), scenario) {
            Err(e) => format!("  counters: {name}: {e}"),
            Ok(trail) => {
                let parted = trail
                    .iter()
                    .zip(&reference)
                    .find(|((_, _, a), (_, _, k))| matches!((a, k), (Some(a), Some(k)) if a != k));
                match parted {
                    Some(((n, l, Some(a)), (_, _, Some(k)))) => {
                        format!("  counters: {name} parts from kvm after step {n} (line {l}): kvm {k} | {name} {a}")
                    }
                    _ => format!("  counters: {name} equal to kvm after every step"),
                }
            }
        };
        lines.push(line);
    }
    lines
}

/// HOOK for the sim backend: the simulated machine under every configuration it must agree
/// under (`sim-ept-on`, `sim-ept-off`, `sim-npt-on`, `sim-npt-off`, `sim-shadow-on`,
/// `sim-shadow-off`; only the pinned format's two when `pinned` is set).
fn sim_backends(pinned: Option<Format>) -> Vec<(String, Box<dyn Backend>)> {
    let machine: Option<fn() -> Box<dyn Backend>> = Some(|| Box::new(vmmu_sim::SimBackend));
    let Some(make) = machine else { return Vec::new() };
    diff::machine_configurations(pinned)
        .into_iter()
        .map(|(suffix, overrides)| {
            let name = diff::machine_source_name(&suffix);
            let b: Box<dyn Backend> = Box::new(diff::Configured::new(&name, make(), overrides));
            (name, b)
        })
        .collect()
}

/// Where the recorded output of `file` would be.
fn expected_path(args: &DiffArgs, file: &Path) -> Option<PathBuf> {
    if args.no_expected {
        return None;
    }
    let stem = file.file_stem()?;
    let dir = match &args.expected {
        Some(d) => d.clone(),
        None => file.parent()?.join("../expected"),
    };
    Some(dir.join(format!("{}.jsonl", stem.to_string_lossy())))
}

/// The recorded source for `file`, if there is one. A `NAME.jsonl` that is there but is not a
/// file (a directory) is a failed source rather than no recording; with `--expected DIR` given,
/// a missing one is said on stderr (the user asked for a comparison that does not happen).
fn recorded(args: &DiffArgs, file: &Path) -> Option<Source> {
    let path = expected_path(args, file)?;
    let shown = path.display();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            let why = format!("{shown}: not a file");
            return Some(Source { name: "expected".into(), outcome: Outcome::Failed(why) });
        }
        Err(e) => {
            if args.expected.is_some() {
                note!(
                    "vmmu diff: {}: no recorded output {shown} ({e}): not compared with one",
                    file.display()
                );
            }
            return None;
        }
    }
    let outcome = match crate::input::read_text(&path) {
        Ok(text) => match parse_observations(&text) {
            Ok(obs) => Outcome::Stream(obs),
            Err(e) => Outcome::Failed(crate::input::shorten(&format!("{shown}: {e}"))),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    };
    Some(Source { name: "expected".into(), outcome })
}

/// Why `--expected DIR` cannot be used, if it cannot: it must be a directory that exists.
fn bad_expected_dir(dir: &Path) -> Option<String> {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!(
            "--expected {shown}: not a directory; it names the directory that holds the recorded \
             outputs NAME.jsonl"
        )),
        Err(e) => Some(format!(
            "--expected {shown}: {e}; it names the directory that holds the recorded outputs \
             NAME.jsonl (or leave it out for ../expected next to each file)"
        )),
    }
}

/// The verdict on a file's sources: [`diff::compare`], allowing the machine's TDP configurations
/// to differ in `dirty-log` pages alone when a shadow configuration agrees exactly
/// ([`diff::compare_allowing_tdp_dirty_pages`]).
fn compare(sources: &[Source]) -> Verdict {
    diff::compare_machine_sources(sources)
}

/// Runs the command; returns the process exit status.
pub fn run(args: &DiffArgs) -> ExitCode {
    if let Some(why) = args.expected.as_deref().and_then(bad_expected_dir) {
        note!("vmmu diff: {why}");
        return ExitCode::from(2);
    }
    let kvm = vmmu_kvm::KvmBackend;
    let mut bad_input = false;
    let mut bad_verdict = false;
    let mut kvm_note_printed = false;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for file in &args.files {
        let shown = file.display().to_string();
        let text = match crate::input::read_text(file) {
            Ok(t) => t,
            Err(e) => {
                note!("vmmu diff: {e}");
                bad_input = true;
                continue;
            }
        };
        let Some(scenario) = crate::input::parse_scenario("diff", &shown, &text) else {
            bad_input = true;
            continue;
        };
        if scenario.steps.is_empty() {
            // Said once, in the verdict line (a note on stderr as well said it twice).
            let verdict = Verdict::Skipped("no steps (only comments or blank lines)".into());
            if writeln!(out, "{}", VerdictLine { path: &shown, verdict: &verdict }).is_err() {
                return ExitCode::from(1);
            }
            continue;
        }
        let pinned = diff::pinned_format(&text, &scenario);
        let machine = sim_backends(pinned);
        let mut sources: Vec<Source> =
            machine.iter().map(|(name, b)| diff::run_source(name, b.as_ref(), &scenario)).collect();
        if !args.no_kvm {
            let s = diff::run_source("kvm", &kvm, &scenario);
            if let Outcome::Unavailable(why) = &s.outcome {
                if !kvm_note_printed {
                    note!("vmmu diff: not comparing with KVM: {why}");
                    kvm_note_printed = true;
                }
            }
            sources.push(s);
        }
        sources.extend(recorded(args, file));
        let mut verdict = compare(&sources);
        if matches!(verdict, Verdict::Differ { .. })
            && matches!(pinned, Some(Format::Ept | Format::Npt))
            && sources.iter().any(|s| diff::machine_source_format(&s.name).is_none())
        {
            // A file pinned to a TDP format has no shadow configuration to check the allowance
            // against: run one as the witness (KVM ignores `format`).
            if let Some((name, b)) = sim_backends(Some(Format::Shadow)).into_iter().next() {
                let mut with_witness = sources.clone();
                with_witness.push(diff::run_source(&name, b.as_ref(), &scenario));
                let v = compare(&with_witness);
                if matches!(v, Verdict::EqualButTdpDirtyPages { .. }) {
                    verdict = v;
                }
            }
        }
        if matches!(verdict, Verdict::Differ { .. }) {
            // The largest gpa a slot may reach depends on the MMU: rerun the TDP
            // configurations at phys_bits=52 to see whether that is the whole difference.
            let rerun = |src: &Source, wide: &vmmu_scenario::Scenario| match machine
                .iter()
                .find(|(name, _)| *name == src.name)
            {
                Some((name, b)) => diff::run_source(name, b.as_ref(), wide),
                None => src.clone(),
            };
            if let Some(v) = diff::allow_tdp_max_gpa(&scenario, &sources, rerun) {
                verdict = v;
            }
        }
        bad_verdict |= verdict.is_bad();
        let mut text = format!("{}", VerdictLine { path: &shown, verdict: &verdict });
        if args.counters {
            for line in counter_lines(&scenario, pinned, &kvm) {
                text.push('\n');
                text.push_str(&line);
            }
        }
        if writeln!(out, "{text}").is_err() {
            // stdout is gone (a closed pipe): nobody reads the rest.
            return ExitCode::from(1);
        }
    }
    if bad_input {
        ExitCode::from(2)
    } else if bad_verdict {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(expected: Option<&str>, no_expected: bool) -> DiffArgs {
        DiffArgs {
            files: vec![],
            expected: expected.map(PathBuf::from),
            no_expected,
            no_kvm: true,
            counters: false,
        }
    }

    #[test]
    fn expected_defaults_to_the_sibling_directory() {
        let f = Path::new("tests/scenarios/x.scn");
        assert_eq!(
            expected_path(&args(None, false), f),
            Some(PathBuf::from("tests/scenarios/../expected/x.jsonl"))
        );
        assert_eq!(expected_path(&args(Some("/e"), false), f), Some(PathBuf::from("/e/x.jsonl")));
        assert_eq!(expected_path(&args(None, true), f), None);
    }
}
