//! `--inject BUG|list`: the re-injectable historical bugs (`vmmu::bugs::Bug`) as the commands
//! name them, shared by `vmmu run`, `vmmu selftest`, `vmmu scenario` and `vmmu bugs`.

use vmmu::bugs::{Bug, BugSet};

/// The bug names, one per line, as `vmmu bugs` and `--inject list` print them.
pub fn list() -> String {
    Bug::ALL.iter().map(|b| format!("{}\n", b.name())).collect()
}

/// `--inject list` as a command with `--json` prints it: a JSON array of the names with `json`,
/// else [`list`].
pub fn listing(json: bool) -> String {
    if json {
        let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
        format!("{}\n", serde_json::to_string(&names).unwrap_or_default())
    } else {
        list()
    }
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

/// A `vmmu run` flag that sets up the sequence a bug needs ([`RunCatch::With`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RunFlag {
    /// `--stress-paths`: faults preempted between decision and installation, hot spots.
    StressPaths,
    /// `--slot-zap-all`: every delete or move zaps every SPTE.
    SlotZapAll,
    /// `--wrap-trap`: MMIO SPTEs a generation wrap would make stale.
    WrapTrap,
    /// `--dirty-log`: a migration thread collecting the dirty log.
    DirtyLog,
    /// `--format shadow`: the shadow MMU, under guests with page tables of their own.
    FormatShadow,
}

impl RunFlag {
    /// The flag as typed.
    pub const fn name(self) -> &'static str {
        match self {
            RunFlag::StressPaths => "--stress-paths",
            RunFlag::SlotZapAll => "--slot-zap-all",
            RunFlag::WrapTrap => "--wrap-trap",
            RunFlag::DirtyLog => "--dirty-log",
            RunFlag::FormatShadow => "--format shadow",
        }
    }
}

/// How `vmmu run` shows a re-injected bug: the README's `--inject` table, what
/// `crates/vmmu-sim/tests/oracle_bugs.rs` and `guest_paging_run.rs` check end to end, and for
/// the others why it cannot (their checks are in `crates/vmmu/tests/bugs_caught.rs`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RunCatch {
    /// The default machine shows it within a few seconds.
    Default,
    /// The machine shows it with this flag.
    With(RunFlag),
    /// It cannot change an access's outcome in this design (`crates/vmmu/src/bugs.rs`).
    NoHarm,
    /// It costs time only (MMIO caching stays off under EPT at MAXPHYADDR 52).
    CostOnly,
}

/// How `vmmu run` shows `bug` ([`RunCatch`]).
pub const fn run_catch(bug: Bug) -> RunCatch {
    use RunCatch::*;
    match bug {
        Bug::MmioSpteIgnoresGen
        | Bug::NoTlbFlushOnZap
        | Bug::InvalidSlotAsMmio
        | Bug::NoFlushOnTableUnlink => Default,
        Bug::VcpuCacheWithoutGen | Bug::MmioOverPresentSpte | Bug::LeafCacheIgnoresEpoch => {
            With(RunFlag::StressPaths)
        }
        Bug::ZappedSpteIsMisconfig => With(RunFlag::SlotZapAll),
        Bug::NoSecondIncrement | Bug::WrapHookAfterPublish => With(RunFlag::WrapTrap),
        Bug::DirtyLogNoFlush => With(RunFlag::DirtyLog),
        // A guest that edits the tables of the space it is not running, then switches to it; an
        // access to a GVA just before and after a switch, two device pages behind it; a table
        // reached through a writable and a read-only path.
        Bug::ShadowTableLeftWritable
        | Bug::TrackWriteKeepsSpte
        | Bug::GvaCacheSurvivesRootSwitch
        | Bug::RoleAccessLastLevel => With(RunFlag::FormatShadow),
        Bug::CacheWhileInProgress | Bug::NoStaleRootCheck => NoHarm,
        Bug::StickyCachingDisable => CostOnly,
    }
}

/// What a run was, as far as showing a bug goes.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    /// MMIO caching in effect (asked for, and not turned off by the MMU).
    pub caching: bool,
    /// vCPUs.
    pub vcpus: u16,
}

/// Why a run of `shape` cannot show `bug`, whatever its seed and length, if it cannot.
pub fn unshowable(bug: Bug, shape: RunShape) -> Option<&'static str> {
    let needs_caching = matches!(
        bug,
        Bug::MmioSpteIgnoresGen
            | Bug::VcpuCacheWithoutGen
            | Bug::GvaCacheSurvivesRootSwitch
            | Bug::NoSecondIncrement
            | Bug::WrapHookAfterPublish
            | Bug::MmioOverPresentSpte
            | Bug::ZappedSpteIsMisconfig
    );
    if needs_caching && !shape.caching {
        return Some(
            "its harm is a stale MMIO SPTE or MMIO cache entry, and MMIO caching was not in \
             effect in this run (the config line says why), so there was none; run it with MMIO \
             caching on",
        );
    }
    if bug == Bug::MmioOverPresentSpte && shape.vcpus < 2 {
        return Some(
            "its harm is another vCPU's translation of the leaf the MMIO SPTE replaced, and \
             the run had one vCPU; give --vcpus 2 or more",
        );
    }
    None
}

/// What to say after a `vmmu run --inject BUG` whose oracle saw nothing: why, and what shows
/// the bug. `given` says whether the run had a flag; `shape` what the run was.
pub fn unseen_note(bug: Bug, given: impl Fn(RunFlag) -> bool, shape: RunShape) -> String {
    const CATCHERS: &str = "cargo test -p vmmu --features historical-bugs --test bugs_caught";
    if let Some(why) = unshowable(bug, shape) {
        return format!("--inject {bug} cannot show in this configuration: {why}");
    }
    match run_catch(bug) {
        RunCatch::With(flag) if !given(flag) => format!(
            "--inject {bug} went unseen: the machine shows it with {flag} (run it with \
             `--inject {bug} {flag}`)",
            flag = flag.name()
        ),
        RunCatch::Default | RunCatch::With(_) => format!(
            "--inject {bug} went unseen in this run: its harm needs a sequence or a race this \
             run did not make (try another --seed or a longer --seconds)"
        ),
        RunCatch::NoHarm => format!(
            "--inject {bug} cannot change an access's outcome in this design \
             (crates/vmmu/src/bugs.rs says why); `{CATCHERS}` checks the invariant its fix keeps"
        ),
        RunCatch::CostOnly => format!(
            "--inject {bug} costs time only: with EPT and --phys-bits 52 MMIO caching stays off \
             (the config line says `effective off`) and every MMIO access takes the slow path, \
             still to the right address; elsewhere it changes nothing"
        ),
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

    /// Every bug gets a note, and one that needs a flag names it when the run lacked it and
    /// says "a sequence or a race" when the run had it.
    #[test]
    fn an_unseen_bug_is_explained() {
        let run = RunShape { caching: true, vcpus: 2 };
        for bug in Bug::ALL {
            let note = unseen_note(bug, |_| false, run);
            assert!(note.starts_with(&format!("--inject {bug} ")), "{note}");
        }
        let bug = Bug::MmioOverPresentSpte;
        assert!(unseen_note(bug, |_| false, run).contains("with --stress-paths"));
        assert!(unseen_note(bug, |f| f == RunFlag::StressPaths, run).contains("a race"));
        let wrap = Bug::WrapHookAfterPublish;
        assert!(unseen_note(wrap, |_| false, run).contains("with --wrap-trap"));
        assert!(unseen_note(Bug::NoStaleRootCheck, |_| true, run).contains("bugs.rs"));
    }

    /// A run that cannot show the bug whatever its seed is told so, not "a race": caching off
    /// for the bugs whose harm is a stale MMIO SPTE or cache entry, one vCPU for the MMIO SPTE
    /// written over another vCPU's leaf.
    #[test]
    fn a_run_that_cannot_show_the_bug_says_why() {
        let run = RunShape { caching: true, vcpus: 2 };
        let off = RunShape { caching: false, ..run };
        let all = |_| true;
        for bug in [Bug::MmioSpteIgnoresGen, Bug::VcpuCacheWithoutGen, Bug::NoSecondIncrement] {
            assert!(unseen_note(bug, all, off).contains("MMIO caching was not in effect"), "{bug}");
            assert!(unseen_note(bug, all, run).contains("a race"), "{bug}");
        }
        let one = RunShape { vcpus: 1, ..run };
        assert!(unseen_note(Bug::MmioOverPresentSpte, all, one).contains("--vcpus 2"));
        // Bugs whose harm does not need caching are not excused by it.
        assert!(unseen_note(Bug::NoTlbFlushOnZap, all, off).contains("a race"));
    }
}
