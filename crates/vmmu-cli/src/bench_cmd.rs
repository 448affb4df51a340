//! `vmmu bench`: the benchmark table of issue 8 (MMIO paths, lookups, memslot updates on vmmu
//! and on real KVM, demand faults, churn), issue 13 (MMIO under the shadow MMU) and issue 16
//! (dirty logging, on vmmu and on real KVM), every row with its ratio and target. The numbers are
//! printed, never judged: the exit status is 0 when the run completed, 1 when a benchmark could
//! not run, 2 on bad arguments.

use crate::html_report::ReportFile;
use crate::stdout::note;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use vmmu_bench::{Options, GROUPS};

/// Options of `vmmu bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print the table as JSON (keys `info`, `rows[].{group,name,value,p99,unit,ratio,ratio_of,target,met,note}`).
    #[arg(long)]
    json: bool,
    /// Fewer samples and shorter phases (under a minute).
    #[arg(long)]
    quick: bool,
    /// Only these row groups (repeatable): mmio, shadow, lookup, memslot, kvm, faults, churn,
    /// dirtylog.
    #[arg(long, value_name = "GROUP", value_parser = clap::builder::PossibleValuesParser::new(GROUPS))]
    only: Vec<String>,
    /// Token samples: checks that every row is produced (for tests; the numbers mean nothing).
    #[arg(long, hide = true)]
    smoke: bool,
    /// Skip the real-KVM measurements (their rows print n/a).
    #[arg(long = "no-kvm")]
    no_kvm: bool,
    /// Also write a self-contained HTML report (every row, bar charts, the churn group's
    /// timeline and update latency histogram) to this file.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
}

/// Runs the benchmarks and prints the table.
pub fn run(args: &BenchArgs) -> ExitCode {
    let report_file = match args.report.as_deref().map(ReportFile::create).transpose() {
        Ok(f) => f,
        Err(e) => {
            note!("vmmu bench: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        quick: args.quick,
        smoke: args.smoke,
        only: args.only.clone(),
        no_kvm: args.no_kvm,
    };
    if !args.json {
        note!(
            "vmmu bench{}: running (load average {})...",
            if args.quick { " --quick" } else { "" },
            vmmu_bench::timing::load_average().map_or("unknown".into(), |l| format!("{l:.2}"))
        );
    }
    match vmmu_bench::run(&opts) {
        Ok(t) => {
            let text = if args.json {
                format!("{}\n", t.to_json())
            } else {
                let mut text = t.to_text();
                for n in &t.info.notes {
                    text.push_str(&format!("- {n}\n"));
                }
                text.push_str(&format!(
                    "- {} CPUs, load average before the run {}, took {:.1} s{}\n",
                    t.info.cpus,
                    t.info.load_before.map_or("unknown".into(), |l| format!("{l:.2}")),
                    t.info.elapsed_s,
                    if t.info.quick { " (--quick)" } else { "" }
                ));
                text
            };
            let printed = crate::stdout::emit("bench", &text);
            let status = if printed { ExitCode::SUCCESS } else { ExitCode::from(1) };
            let Some(file) = report_file else { return status };
            let path = file.path().display().to_string();
            let flags = [
                ("--quick", args.quick.to_string()),
                ("--smoke", args.smoke.to_string()),
                ("--only", if args.only.is_empty() { "all".into() } else { args.only.join(" ") }),
                ("--no-kvm", args.no_kvm.to_string()),
            ];
            match file.write(&crate::report_pages::bench_page(&flags, &t)) {
                Ok(()) => {
                    note!("vmmu bench: report written to {path}");
                    status
                }
                Err(e) => {
                    note!("vmmu bench: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            note!("vmmu bench: {e}");
            ExitCode::from(1)
        }
    }
}
