//! `vmmu scenario FILE`: parse a scenario, run it on a backend, print the observations.
//!
//! Exit status: 0 when the scenario ran (or was skipped: `{"skipped":"REASON"}`), 2 when the file
//! cannot be read or does not parse (message on stderr, nothing runs), 1 when the backend failed
//! (the observations made so far are on stdout, the error naming the step on stderr) or when
//! stdout could not take an observation (the run stops there: a reader such as `head -1` left).

use crate::args::{Format, OnOff};
use crate::stdout::note;
use clap::{Args, ValueEnum};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use vmmu_scenario::{Backend, Overrides};

/// Which machine runs the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The software machine (the vmmu MMU).
    Sim,
    /// Real /dev/kvm.
    Kvm,
}

/// Arguments of `vmmu scenario`.
#[derive(Args, Debug)]
// `--seconds -1` is a bad value (named as such), not an unknown flag `-1`.
#[command(allow_negative_numbers = true)]
pub struct ScenarioArgs {
    /// The scenario file (format: shared/design/scenarios.md; `-`: standard input).
    pub file: PathBuf,
    /// The machine to run it on.
    #[arg(long, value_enum, default_value_t = BackendKind::Sim)]
    pub backend: BackendKind,
    /// Override the file's `format=`.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Override the file's `mmio_caching=`.
    #[arg(long, value_enum)]
    pub mmio_caching: Option<OnOff>,
    /// Override the file's `phys_bits=` (36..=52).
    #[arg(long, value_parser = clap::value_parser!(u8).range(36..=52))]
    pub phys_bits: Option<u8>,
    /// After each step, print the shadow MMU's counters (KVM's `mmu_cache_miss`,
    /// `mmu_shadow_zapped`, `mmu_recycled`, `mmu_flooded`; cumulative) on stderr, as
    /// `step N (line L): ...`; a machine without them prints `step N (line L): none`.
    #[arg(long)]
    pub counters: bool,
    /// Re-inject a historical KVM bug into the software machine's MMU (`--backend sim`; a build
    /// with `--features historical-bugs`): shows whether the scenario's observations or the
    /// machine's own checks catch it (`--inject list` lists them).
    #[arg(long, value_name = "BUG")]
    pub inject: Option<String>,
}

/// The backend for `kind` with the bugs `--inject` names (the software machine's only), or why
/// it cannot be had. Adding a backend is one match arm.
fn backend(kind: BackendKind, inject: Option<&str>) -> Result<Box<dyn Backend>, String> {
    // The backend first: a build without the feature would otherwise suggest re-running
    // `--backend kvm --inject BUG` with it, which that build refuses.
    match kind {
        BackendKind::Sim => {
            let bugs = crate::inject::bug_set(inject, "scenario")?;
            Ok(Box::new(vmmu_sim::SimBackendInjected { bugs }))
        }
        BackendKind::Kvm if inject.is_some() => Err(format!(
            "--inject re-injects a bug into the software machine's MMU; --backend kvm runs the \
             kernel's (drop --inject {}, or run --backend sim)",
            inject.unwrap_or_default()
        )),
        BackendKind::Kvm => Ok(Box::new(vmmu_kvm::KvmBackend)),
    }
}

/// Runs the command; returns the process exit status.
pub fn run(args: &ScenarioArgs) -> ExitCode {
    if args.inject.as_deref() == Some("list") {
        // As `vmmu run --inject list`.
        let listed = crate::stdout::emit("scenario", &crate::inject::list());
        return if listed { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    let shown = args.file.display();
    let text = match crate::input::read_text(&args.file) {
        Ok(t) => t,
        Err(e) => {
            note!("vmmu scenario: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(mut scenario) = crate::input::parse_scenario("scenario", &shown, &text) else {
        return ExitCode::from(2);
    };
    if scenario.steps.is_empty() {
        note!("vmmu scenario: {shown}: no steps (only comments or blank lines): nothing runs");
    }
    scenario.apply(&Overrides {
        format: args.format.map(Format::scenario),
        mmio_caching: args.mmio_caching.map(OnOff::on),
        phys_bits: args.phys_bits,
    });
    let backend = match backend(args.backend, args.inject.as_deref()) {
        Ok(b) => b,
        Err(msg) => {
            note!("vmmu scenario: {msg}");
            // A bad `--inject` is a bad argument, as for `vmmu run`; a backend that cannot be
            // had is a failure.
            return ExitCode::from(if args.inject.is_some() { 2 } else { 1 });
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_error = None;
    let mut counters =
        |step: &vmmu_scenario::Step, c: Option<vmmu_scenario::ShadowCounters>| match c {
            Some(c) => note!("step {} (line {}): {c}", step.number, step.line),
            None => note!("step {} (line {}): none", step.number, step.line),
        };
    // A write that fails stops the run: the rest would be computed for nobody (a reader such as
    // `head -1` that left would otherwise wait for the whole scenario to run).
    let result = vmmu_scenario::run_counted_while(
        backend.as_ref(),
        &scenario,
        &mut |o| match writeln!(out, "{o}") {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_error = Some(e);
                ControlFlow::Break(())
            }
        },
        if args.counters { Some(&mut counters) } else { None },
    );
    if write_error.is_none() {
        write_error = out.flush().err();
    }
    // The observations are the command's output: a run that could not print them all failed.
    if let Some(e) = &write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            note!("vmmu scenario: {shown}: cannot write the observations to stdout: {e}");
        }
    }
    match result {
        Ok(()) if write_error.is_none() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(1),
        Err(e) => {
            note!("vmmu scenario: {shown}: {e}");
            if matches!(
                e,
                vmmu_scenario::RunError::Start {
                    source: vmmu_scenario::BackendError::Unavailable(_),
                    ..
                }
            ) && args.backend == BackendKind::Kvm
            {
                note!(
                    "vmmu scenario: nothing ran; `--backend sim` (the default) runs it on the \
                     software machine, and `vmmu diff` skips KVM where it is not usable"
                );
            }
            ExitCode::from(1)
        }
    }
}
