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
        Err(format!(
            "--inject {bug}: this build cannot re-inject bugs; run it as \
             `cargo run --release --features historical-bugs -- {command} --inject {bug}`"
        ))
    }
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
        assert!(bug_set(Some(first), "selftest").unwrap_err().contains("-- selftest --inject"));
    }
}
