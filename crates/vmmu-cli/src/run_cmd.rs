//! `vmmu run`: the software machine on the real MMU, with the oracle judging every access.
//! Exit status: 0 clean, 1 oracle violations (or a run that could not complete), 2 bad arguments.

use clap::Args;
use std::process::ExitCode;
use std::time::Duration;
use vmmu::bugs::BugSet;
use vmmu::spte::FormatKind;
use vmmu_sim::options::{Format, OnOff, RunOptions};
use vmmu_sim::progress::Progress;
use vmmu_sim::{Machine, RealMmu, RealMmuConfig, Report};

/// Options of `vmmu run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    opts: RunOptions,
    /// Stop after this many memslot updates (a churn run: the device manager updates back to
    /// back; `--seconds` still bounds the run).
    #[arg(long, value_name = "UPDATES")]
    churn: Option<u64>,
    /// Start the memslot generation just below the 2^19 MMIO-generation wrap, as KVM once did
    /// (before v5.1) to exercise the wrap early.
    #[arg(long = "near-wrap")]
    near_wrap: bool,
    /// Set the MMIO-generation wrap trap: MMIO SPTEs left on the absent DIMM right after a wrap,
    /// the DIMM plugged, about 2^19 generation swaps on a dummy slot, then the DIMM read while
    /// the next wrap is published (2^19 swaps, well under a second here; see the README).
    #[arg(long = "wrap-trap", conflicts_with = "near_wrap")]
    wrap_trap: bool,
    /// Delete and move zap every root (KVM's KVM_X86_QUIRK_SLOT_ZAP_ALL) instead of the slot.
    #[arg(long = "slot-zap-all")]
    slot_zap_all: bool,
    /// Re-inject a historical KVM bug (`--inject list` lists them). Needs a build with
    /// `--features historical-bugs`.
    #[arg(long, value_name = "NAME")]
    inject: Option<String>,
}

/// How far below the wrap `--near-wrap` starts.
const NEAR_WRAP_MARGIN: u64 = 2048;

fn bugs(inject: Option<&str>) -> Result<BugSet, String> {
    let Some(name) = inject else { return Ok(BugSet::NONE) };
    let bug = vmmu::bugs::Bug::from_name(name).ok_or_else(|| {
        let names: Vec<_> = vmmu::bugs::Bug::ALL.iter().map(|b| b.name()).collect();
        format!("--inject {name}: no such bug; known: {}", names.join(", "))
    })?;
    #[cfg(feature = "historical-bugs")]
    {
        Ok(BugSet::only(bug))
    }
    #[cfg(not(feature = "historical-bugs"))]
    {
        Err(format!(
            "--inject {bug}: this build cannot re-inject bugs; run it as \
             `cargo run --release --features historical-bugs -- run --inject {bug}`"
        ))
    }
}

fn one_run(
    args: &RunArgs,
    caching: bool,
    bugs: BugSet,
    show_progress: bool,
) -> Result<Report, String> {
    let o = &args.opts;
    let mut mc = o.machine_config().map_err(|e| e.to_string())?;
    mc.mmio_caching_requested = caching;
    if let Some(n) = args.churn {
        mc.max_updates = Some(n);
        mc.update_pause = Duration::ZERO;
    }
    mc.wrap_trap = args.wrap_trap;
    let machine = Machine::new(mc).map_err(|e| format!("machine: {e}"))?;
    let generation_base = if args.wrap_trap {
        machine.wrap_trap_generation_base()
    } else if args.near_wrap {
        (1 << 19) - NEAR_WRAP_MARGIN
    } else {
        0
    };
    let format = match o.format {
        Format::Ept => FormatKind::Ept,
        Format::Npt => FormatKind::Npt,
    };
    let mmu = RealMmu::new(
        machine.host().clone(),
        RealMmuConfig {
            format,
            phys_bits: o.phys_bits,
            mmio_caching: caching,
            vcpus: o.vcpus as usize,
            generation_base,
            slot_zap_all: args.slot_zap_all,
            bugs,
        },
    )
    .map_err(|e| format!("MMU: {e}"))?;
    let progress = if show_progress {
        Progress::for_terminal(machine.config().duration)
    } else {
        Progress::hidden()
    };
    let report = machine
        .run_with_progress(&mmu, &mut |snap| progress.update(snap))
        .map_err(|e| format!("run: {e}"))?;
    progress.finish();
    Ok(report)
}

fn per_sec(r: &Report) -> f64 {
    r.total_accesses() as f64 / r.elapsed_seconds.max(1e-9)
}

fn mmio_ns(r: &Report) -> f64 {
    r.mmu.extra.as_ref().map_or(0.0, |c| c.mmio_ns_per_translation())
}

/// Runs `vmmu run`.
pub fn run(args: &RunArgs) -> ExitCode {
    if args.inject.as_deref() == Some("list") {
        for b in vmmu::bugs::Bug::ALL {
            println!("{}", b.name());
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = args.opts.validate() {
        eprintln!("vmmu run: {e}");
        return ExitCode::from(2);
    }
    let bugs = match bugs(args.inject.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vmmu run: {e}");
            return ExitCode::from(2);
        }
    };
    let json = args.opts.json;
    if args.opts.compare_caching {
        let on = one_run(args, true, bugs, !json);
        let off = one_run(args, false, bugs, !json);
        let (on, off) = match (on, off) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("vmmu run: {e}");
                return ExitCode::from(1);
            }
        };
        let cost_ratio = if mmio_ns(&on) > 0.0 { mmio_ns(&off) / mmio_ns(&on) } else { 0.0 };
        let tput_ratio = per_sec(&on) / per_sec(&off).max(1e-9);
        if json {
            println!(
                "{{\"caching_on\":{},\"caching_off\":{},\"ratios\":{{\"mmio_ns_per_exit_on\":{:.1},\"mmio_ns_per_exit_off\":{:.1},\"mmio_cost_off_over_on\":{:.3},\"throughput_on_over_off\":{:.3}}}}}",
                on.to_json(),
                off.to_json(),
                mmio_ns(&on),
                mmio_ns(&off),
                cost_ratio,
                tput_ratio
            );
        } else {
            println!("== MMIO caching on\n{on}\n== MMIO caching off\n{off}");
            println!(
                "compare: MMIO handling {:.0} ns/exit with caching, {:.0} ns without ({cost_ratio:.2}x); \
                 throughput {:.0} vs {:.0} accesses/s ({tput_ratio:.2}x)",
                mmio_ns(&on),
                mmio_ns(&off),
                per_sec(&on),
                per_sec(&off)
            );
        }
        let bad = on.oracle.violations + off.oracle.violations;
        return if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    let caching = args.opts.mmio_caching == OnOff::On;
    match one_run(args, caching, bugs, !json) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                println!("{report}");
            }
            if report.oracle.violations == 0 && report.vcpus.iter().all(|v| v.errors == 0) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vmmu run: {e}");
            ExitCode::from(1)
        }
    }
}
