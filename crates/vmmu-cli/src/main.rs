//! The `vmmu` command: `run` (the default), `scenario`, `diff`, `replay`, `bench`, `selftest`,
//! `bugs`.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod args;
mod bench_cmd;
mod diff_cmd;
mod html_report;
mod inject;
mod input;
mod progress;
mod replay_cmd;
mod replay_kvm;
mod report_pages;
mod run_cmd;
mod run_report;
mod scenario_cmd;
mod selftest_cmd;
mod stdout;

/// A virtual MMU with generation-checked MMIO caching: run it, check it, measure it.
#[derive(Parser, Debug)]
#[command(
    name = "vmmu",
    version,
    about,
    after_help = "Without a command, vmmu runs `vmmu run`, and options given without a command \
                  are run's (`vmmu --seconds 1`): see `vmmu run --help`."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the software machine on the MMU for a few seconds and report (the default command).
    Run(run_cmd::RunArgs),
    /// Print the names of the historical bugs `--inject` takes (re-injecting one needs a build
    /// with `--features historical-bugs`).
    Bugs,
    /// Run a scenario file and print its observations (JSON Lines) on stdout.
    Scenario(scenario_cmd::ScenarioArgs),
    /// Run scenario files on every machine configuration, KVM and recorded outputs; compare.
    Diff(diff_cmd::DiffArgs),
    /// Replay recorded VM boots (vmmu traces) on every machine configuration and on /dev/kvm.
    Replay(replay_cmd::ReplayArgs),
    /// Measure: MMIO paths, lookups, memslot updates (and the same on /dev/kvm), faults, churn,
    /// dirty logging.
    Bench(bench_cmd::BenchArgs),
    /// KVM's memslot selftests restated, on the software machine and on /dev/kvm side by side.
    Selftest(selftest_cmd::SelftestArgs),
}

/// The command line, with `run` put in front of options given without a command: `run` is the
/// default command, so `vmmu --seconds 1` is `vmmu run --seconds 1` (clap alone refused it as an
/// unexpected argument). `-h`, `--help`, `-V` and `--version` stay `vmmu`'s own.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let run_option = args
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| a.starts_with('-') && !["-h", "--help", "-V", "--version"].contains(&a));
    if run_option {
        args.insert(1, "run".into());
    }
    args
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(args()) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Some(Command::Scenario(args)) => scenario_cmd::run(&args),
        Some(Command::Diff(args)) => diff_cmd::run(&args),
        Some(Command::Run(args)) => run_cmd::run(&args),
        Some(Command::Replay(args)) => replay_cmd::run(&args),
        Some(Command::Bench(args)) => bench_cmd::run(&args),
        Some(Command::Selftest(args)) => selftest_cmd::run(&args),
        None => match Cli::try_parse_from(["vmmu", "run"]) {
            Ok(Cli { command: Some(Command::Run(args)) }) => run_cmd::run(&args),
            _ => ExitCode::from(2),
        },
        Some(Command::Bugs) => {
            if stdout::emit("bugs", &inject::list()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `vmmu --help` lists no options, since they are `run`'s: it says where they are (it
    /// showed only `Usage: vmmu [COMMAND]`, though `vmmu --seconds 1` works).
    #[test]
    fn top_level_help_says_options_go_to_run() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("see `vmmu run --help`"), "{help}");
    }
}
