//! `vmmu replay TRACE...`: replay recorded VM boots (vmmu traces, `../shared/design/traces.md`)
//! on the software machine under every MMU x MMIO caching on/off (unless pinned by flags): the
//! TDP MMU with EPT and with NPT, and the shadow MMU (the vCPU then runs without paging when the
//! trace stays below 4 GiB, else on identity-mapped guest page tables, as the recording hosts'
//! shadow-paging KVM shadowed the guest's); and on real `/dev/kvm` where it is usable; and
//! report per trace.
//!
//! Exit status: 2 when a file cannot be read or is malformed (the message names the file and the
//! line; the other files still run) or on bad flags; else 1 when any replay refused a slot
//! request, did not classify a recorded MMIO access as MMIO, had an oracle violation, or could
//! not run, or the `/dev/kvm` half diverged; else 3 when a trace's capture lost events and its
//! checks against the recording are therefore not judged (the trace kit's status for such a
//! capture; an oracle violation in the replay's own accesses still gives 1); else 0.

use crate::args::{Format, OnOff};
use crate::html_report::ReportFile;
use crate::input::{shorten, Looks};
use crate::replay_kvm;
use crate::stdout::note;
use clap::Args;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use vmmu::spte::FormatKind;
use vmmu::vm::MmuKind;
use vmmu_sim::replay::parse::EventOp;
use vmmu_sim::replay::{self, ReplayConfig, Trace, TraceReport, Verdict};

/// Arguments of `vmmu replay`.
#[derive(Args, Debug)]
// `--seconds -1` is a bad value (named as such), not an unknown flag `-1`.
#[command(allow_negative_numbers = true)]
pub struct ReplayArgs {
    /// Trace files (vmmu trace v1, JSON Lines; `-`: standard input).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print the reports as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Do not replay on /dev/kvm.
    #[arg(long)]
    pub no_kvm: bool,
    /// Only this MMU: the TDP MMU with EPT or NPT, or shadow paging [default: all three].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Only this MMIO caching setting [default: both].
    #[arg(long = "mmio-caching", value_enum)]
    pub mmio_caching: Option<OnOff>,
    /// Host MAXPHYADDR of the software machine (36..=52) [default: 46, or what the trace's
    /// highest guest-physical address needs (the recording host accepted its slots)].
    #[arg(long = "phys-bits", value_parser = clap::value_parser!(u8).range(36..=52))]
    pub phys_bits: Option<u8>,
    /// Also write a self-contained HTML report (per trace and configuration: timeline on the
    /// recorded clock, latency histograms) to this file.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
}

impl ReplayArgs {
    /// The options as given, for the HTML report.
    fn flags(&self) -> Vec<(&'static str, String)> {
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        vec![
            ("traces", files.join(" ")),
            (
                "--format",
                self.format
                    .map_or("ept, npt and shadow".into(), |f| format!("{f:?}").to_lowercase()),
            ),
            (
                "--mmio-caching",
                self.mmio_caching.map_or("on and off".into(), |c| format!("{c:?}").to_lowercase()),
            ),
            (
                "--phys-bits",
                self.phys_bits.map_or("per trace (46 or more)".into(), |b| b.to_string()),
            ),
            ("--no-kvm", self.no_kvm.to_string()),
        ]
    }
}

/// The machine configurations to replay `trace` under: every one, or those the flags pick.
fn configs(args: &ReplayArgs, trace: &Trace) -> Vec<ReplayConfig> {
    let phys_bits = args.phys_bits.unwrap_or_else(|| replay::phys_bits_for(trace));
    ReplayConfig::every(phys_bits)
        .into_iter()
        .filter(|c| match args.format {
            None => true,
            Some(Format::Ept) => c.mmu == MmuKind::Tdp && c.format == FormatKind::Ept,
            Some(Format::Npt) => c.mmu == MmuKind::Tdp && c.format == FormatKind::Npt,
            Some(Format::Shadow) => c.mmu == MmuKind::Shadow,
        })
        .filter(|c| args.mmio_caching.is_none_or(|m| m.on() == c.mmio_caching))
        .collect()
}

fn warnings(args: &ReplayArgs, trace: &Trace) -> Vec<String> {
    let mut w = Vec::new();
    if trace.events.is_empty() {
        w.push("the trace has no events: nothing was replayed or checked".to_string());
    }
    let auto = replay::phys_bits_for(trace);
    let highest = replay::highest_telling_gpa(trace);
    let needed = highest.map_or(0, |last| 64 - last.leading_zeros());
    if let Some(pinned) = args.phys_bits.filter(|&b| u32::from(b) < needed) {
        // The user's experiment ("what would a narrower host do"), but its failures must not
        // read as the MMU's.
        w.push(format!(
            "--phys-bits {pinned} is below the {needed} bits the trace's guest-physical {:#x} needs \
             (the recording host accepted it): slots refused and accesses misclassified above \
             2^{pinned} come from the option, not from the MMU (without it: MAXPHYADDR {auto})",
            highest.unwrap_or(0)
        ));
    }
    if args.phys_bits.is_none() && auto > replay::DEFAULT_PHYS_BITS {
        w.push(format!(
            "the trace reaches guest-physical {:#x}: the software machine runs with MAXPHYADDR {auto} \
             (the recording host, which ran it, had at least that many bits; \
             --phys-bits overrides)",
            highest.unwrap_or(0)
        ));
    }
    if let Some(s) = &trace.summary {
        match s.lost_events {
            Some(lost) if lost > 0 => w.push(format!(
                "the capture lost {lost} events: the trace is incomplete, so refusals and misclassifications \
                 against it are counted but not judged (UNTRUSTED); the oracle's checks of the replay's own accesses still are"
            )),
            Some(_) => {}
            None => w.push(
                "the summary does not say whether the capture lost events (no \"lost_events\"): \
                 the trace is judged as a complete capture; a trace converted with --allow-lost \
                 must keep its count, or its verdicts cannot be trusted"
                    .to_string(),
            ),
        }
        // Only a vCPU thread's KVM_RUN makes an MMIO access: a summary of none beside recorded
        // accesses contradicts its own trace (newcomer audit 44).
        let accesses = trace.count(EventOp::Mmio);
        if s.vcpu_threads == Some(0) && accesses > 0 {
            w.push(format!(
                "the summary counts no vCPU thread (vcpu_threads 0) but the trace has {accesses} \
                 MMIO accesses, which only a vCPU's KVM_RUN makes: the summary does not belong to \
                 these events, or the capture missed the KVM_RUN calls"
            ));
        }
        // QEMU stops the VM on these (an emulation failure, a failed VM entry): the guest
        // died there, which no event of the trace shows and no verdict of the MMU can (hunt 44r:
        // an AP fetching its next instruction from a RAM slot QEMU was deleting to re-create
        // it, around an SMRAM change; the trace replays cleanly and ends where the VM stopped).
        let fatal: Vec<String> = ["KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_FAIL_ENTRY"]
            .iter()
            .filter_map(|r| {
                s.userspace_exits.get(*r).filter(|&&n| n > 0).map(|n| format!("{r} ({n})"))
            })
            .collect();
        if !fatal.is_empty() {
            w.push(format!(
                "the recorded VM stopped on {}: KVM could not go on running a vCPU there (an \
                 emulation failure, e.g. an instruction fetched while the VMM deleted and re-created \
                 its slot) and QEMU pauses the guest, so the recording is of a guest that failed; \
                 the verdict judges the MMU on the events recorded, not the guest",
                fatal.join(", ")
            ));
        }
        if let Some(threads) = s.vcpu_threads.filter(|&n| n > 1) {
            w.push(format!(
                "{threads} vCPU threads recorded; v1 does not say which vCPU made an access, so this replay (one vCPU) is exact only for 1 (an access that reaches RAM just after the slot request that made its address RAM is counted as raced with it, not misclassified)"
            ));
        }
    }
    w
}

/// Replays one parsed trace everywhere.
fn replay_trace(args: &ReplayArgs, file: &str, trace: &Trace) -> TraceReport {
    let mut events = BTreeMap::new();
    for op in EventOp::ALL {
        events.insert(op.to_string(), trace.count(op));
    }
    let s = trace.summary.clone().unwrap_or_default();
    let mut report = TraceReport {
        file: file.to_string(),
        source: trace.source.clone(),
        events,
        has_summary: trace.summary.is_some(),
        kernel_mmio_dropped: s.kernel_mmio_dropped,
        lost_events: s.lost_events,
        vcpu_threads: s.vcpu_threads,
        warnings: warnings(args, trace),
        ..TraceReport::default()
    };
    for cfg in configs(args, trace) {
        match replay::replay(trace, &cfg) {
            Ok(r) => report.runs.push(r),
            Err(e) => report.run_errors.push(format!("sim-{}: cannot replay: {e}", cfg.name())),
        }
    }
    report.kvm = if args.no_kvm { replay_kvm::skipped("--no-kvm") } else { replay_kvm::run(trace) };
    report.judge();
    report
}

/// Runs the command; returns the process exit status.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let report_file = match args.report.as_deref().map(ReportFile::create).transpose() {
        Ok(f) => f,
        Err(e) => {
            note!("vmmu replay: {e}");
            return ExitCode::from(2);
        }
    };
    let mut bad_input = false;
    // Each file that could not be read or parsed, with why (also in `--json`, which would
    // otherwise hold only the traces that ran, and `"passed": false` with no reason).
    let mut input_errors = Vec::new();
    // The HTML report could not be written.
    let mut report_failed = false;
    // The worst verdict of the traces that ran.
    let mut verdict = Verdict::Pass;
    let mut reports = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for path in &args.files {
        let file = path.display().to_string();
        let text = match crate::input::read_text_within(path, crate::input::MAX_TRACE_BYTES) {
            Ok(t) => t,
            Err(e) => {
                note!("vmmu replay: {e}");
                input_errors.push(serde_json::json!({ "file": file, "error": e.to_string() }));
                bad_input = true;
                continue;
            }
        };
        let trace = match replay::parse(&text) {
            Ok(t) => t,
            Err(e) => {
                let why =
                    format!("{file}:{}: malformed trace: {}", e.line, shorten(&e.kind.to_string()));
                note!("vmmu replay: {why}");
                input_errors.push(serde_json::json!({ "file": file, "error": why }));
                if let Some(looks @ (Looks::Scenario | Looks::Recording | Looks::Capture)) =
                    Looks::of(&text)
                {
                    note!("vmmu replay: {file}: {}", looks.hint());
                }
                bad_input = true;
                continue;
            }
        };
        let report = replay_trace(args, &file, &trace);
        for e in &report.run_errors {
            note!("vmmu replay: {file}: {e}");
        }
        verdict = verdict.and(report.verdict);
        if !args.json && write!(out, "{}", report.text()).is_err() {
            return ExitCode::from(1);
        }
        reports.push(report);
    }
    if args.json {
        let doc = serde_json::json!({
            "traces": reports,
            "input_errors": input_errors,
            "passed": verdict == Verdict::Pass && !bad_input,
        });
        if writeln!(out, "{doc:#}").is_err() {
            return ExitCode::from(1);
        }
    }
    if let Some(file) = report_file {
        let path = file.path().display().to_string();
        match file.write(&crate::report_pages::replay_page(&args.flags(), &reports)) {
            Ok(()) => note!("vmmu replay: report written to {path}"),
            Err(e) => {
                note!("vmmu replay: {e}");
                report_failed = true;
            }
        }
    }
    if bad_input {
        ExitCode::from(2)
    } else if report_failed || verdict == Verdict::Fail {
        ExitCode::from(1)
    } else if verdict == Verdict::Untrusted {
        // The trace kit's own status for a capture that lost events.
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}
