//! Runs every scenario of the corpus (`tests/scenarios/*.scn`) on real `/dev/kvm` and compares
//! the output byte for byte with `tests/expected/NAME.jsonl`. Without a usable `/dev/kvm` it
//! prints why and passes.
use std::path::{Path, PathBuf};
use vmmu_kvm::KvmBackend;
use vmmu_scenario::{first_difference, parse, parse_observations, run_collect};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus() -> Vec<PathBuf> {
    let dir = repo_root().join("tests/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "scn"))
        .collect();
    files.sort();
    files
}

/// Every corpus file parses and has an expected output in canonical form, and vice versa.
/// (Runs with or without KVM.)
#[test]
fn corpus_is_complete_and_well_formed() {
    let files = corpus();
    assert!(files.len() >= 25, "the corpus has {} scenarios, want >= 25", files.len());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.starts_with("# Restates:"),
            "{}: header must name what it restates",
            f.display()
        );
        parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let exp = expected_path(f);
        let exp_text = std::fs::read_to_string(&exp)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/regen-expected)", exp.display()));
        parse_observations(&exp_text).unwrap_or_else(|e| panic!("{}: {e}", exp.display()));
    }
    let dir = repo_root().join("tests/expected");
    for e in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
        let stem = e.path().file_stem().unwrap().to_string_lossy().into_owned();
        let scn = repo_root().join("tests/scenarios").join(format!("{stem}.scn"));
        assert!(scn.exists(), "{} has no scenario", e.path().display());
    }
}

fn expected_path(scn: &Path) -> PathBuf {
    let stem = scn.file_stem().unwrap().to_string_lossy().into_owned();
    repo_root().join("tests/expected").join(format!("{stem}.jsonl"))
}

#[test]
fn corpus_on_kvm_matches_expected() {
    match vmmu_kvm::probe() {
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
        Ok(info) => println!("KVM: {info:?}"),
    }
    let mut failures = Vec::new();
    let files = corpus();
    for f in &files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let scenario = parse(&std::fs::read_to_string(f).unwrap()).unwrap();
        let expected =
            std::fs::read_to_string(expected_path(f)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = match run_collect(&KvmBackend, &scenario) {
            Ok(o) => o,
            Err((_, e)) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let got_text: String = got.iter().map(|o| format!("{o}\n")).collect();
        if got_text != expected {
            let want = parse_observations(&expected).unwrap_or_default();
            let what = match first_difference(&want, &got) {
                Some((i, w, g)) => format!(
                    "observation {}: expected {}, got {}",
                    i + 1,
                    w.map_or("nothing".into(), ToString::to_string),
                    g.map_or("nothing".into(), ToString::to_string)
                ),
                None => "same observations, different bytes".into(),
            };
            failures.push(format!("{name}: {what}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios differ on KVM:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    println!("{} scenarios match on KVM", files.len());
}
