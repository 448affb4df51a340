//! `--inject BUG|list`: the re-injectable historical bugs (`vmmu::bugs::Bug`) as the commands
//! name them, shared by `vmmu run`, `vmmu selftest` and `vmmu bugs`.

use vmmu::bugs::{Bug, BugSet};

/// The bug names, one per line, as `vmmu bugs` and `--inject list` print them.
pub fn list() -> String {
    Bug::ALL.iter().map(|b| format!("{}\n", b.name())).collect()
}

/// The bugs `--inject NAME` asks `vmmu COMMAND` to re-inject (none without the flag). `Err` says
/// what was wrong: an unknown name (with the known ones), or a build without the
/// `historical-bugs` feature (with the command that has it).
pub fn bug_set(inject: Option<&str>, command: &str) -> Result<BugSet, String> {
    let Some(name) = inject else { return Ok(BugSet::NONE) };
    let bug = Bug::from_name(name).ok_or_else(|| {
        let names: Vec<_> = Bug::ALL.iter().map(|b| b.name()).collect();
        format!("--inject {name}: no such bug; known: {}", names.join(", "))
    })?;
    #[cfg(feature = "historical-bugs")]
    {
        let _ = command;
        Ok(BugSet::only(bug))
    }
    #[cfg(not(feature = "historical-bugs"))]
    {
        let argv: Vec<String> =
            std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
        Err(format!(
            "--inject {bug}: this build cannot re-inject bugs; run it as \
             `cargo run --release --features historical-bugs -- {}`",
            rerun(command, bug.name(), &argv)
        ))
    }
}

/// The arguments that re-run this command in a build with the feature: the command line as
/// given (`argv` without the program), so that its file and other flags are kept (`vmmu
/// scenario FILE --inject BUG` needs its FILE), or `COMMAND --inject BUG` where that line does
/// not hold `--inject` (options given without a command, as `vmmu --inject BUG`, go to `run`).
#[cfg_attr(feature = "historical-bugs", allow(dead_code))]
fn rerun(command: &str, bug: &str, argv: &[String]) -> String {
    let injects = argv.iter().any(|a| a == "--inject" || a.starts_with("--inject="));
    if !injects {
        return format!("{command} --inject {bug}");
    }
    let quoted = argv.iter().map(|a| {
        let plain = !a.is_empty()
            && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
        if plain {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    });
    let mut words: Vec<String> = quoted.collect();
    if argv.first().is_none_or(|a| a != command) {
        words.insert(0, command.to_string());
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_listed() {
        assert_eq!(list().lines().count(), Bug::ALL.len());
        assert_eq!(bug_set(None, "run"), Ok(BugSet::NONE));
        let e = bug_set(Some("nope"), "run").unwrap_err();
        assert!(e.contains("no such bug") && e.contains(Bug::ALL[0].name()), "{e}");
        let first = Bug::ALL[0].name();
        #[cfg(feature = "historical-bugs")]
        assert_eq!(bug_set(Some(first), "run"), Ok(BugSet::only(Bug::ALL[0])));
        #[cfg(not(feature = "historical-bugs"))]
        assert!(bug_set(Some(first), "selftest").unwrap_err().contains("-- selftest "));
    }

    /// The suggested command keeps what the user gave: `vmmu scenario FILE --inject BUG` used
    /// to be told to run `... -- scenario --inject BUG`, which has no FILE and fails.
    #[test]
    fn the_rerun_hint_keeps_the_command_line() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let bug = "no-tlb-flush-on-zap";
        assert_eq!(
            rerun("scenario", bug, &v(&["scenario", "t.scn", "--inject", bug])),
            format!("scenario t.scn --inject {bug}")
        );
        assert_eq!(
            rerun("run", bug, &v(&["--stress-paths", "--inject", bug])),
            format!("run --stress-paths --inject {bug}")
        );
        assert_eq!(
            rerun("scenario", bug, &v(&["scenario", "my file.scn", &format!("--inject={bug}")])),
            format!("scenario 'my file.scn' --inject={bug}")
        );
        // A command line without `--inject` (a test harness's): the bare form.
        assert_eq!(
            rerun("selftest", bug, &v(&["--nocapture"])),
            format!("selftest --inject {bug}")
        );
    }
}
