//! The `vmmu` command. Subcommands are added as the machine, scenarios and benches land.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod diff_cmd;
mod scenario_cmd;

/// A virtual MMU with generation-checked MMIO caching: run it, check it, measure it.
#[derive(Parser, Debug)]
#[command(name = "vmmu", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the historical bugs this build can re-inject.
    Bugs,
    /// Run a scenario file and print its observations (JSON Lines) on stdout.
    Scenario(scenario_cmd::ScenarioArgs),
    /// Run scenario files on every machine configuration, KVM and recorded outputs; compare.
    Diff(diff_cmd::DiffArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Some(Command::Scenario(args)) => scenario_cmd::run(&args),
        Some(Command::Diff(args)) => diff_cmd::run(&args),
        Some(Command::Bugs) | None => {
            for b in vmmu::bugs::Bug::ALL {
                println!("{}", b.name());
            }
            ExitCode::SUCCESS
        }
    }
}
