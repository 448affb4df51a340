//! `vmmu run`: the software machine on the real MMU, with the oracle judging every access.
//! Exit status: 0 clean, 1 oracle violations (or a run that could not complete), 2 bad arguments.
//!
//! The flags, the progress bar and the rendering live here; the run itself is
//! [`vmmu_sim::RunOptions::run`] and its report is data ([`vmmu_sim::Report`]).
//!
//! Bad values are refused at parse time with a message naming the flag, the value and the allowed
//! range (clap exits with status 2 for them, which is `vmmu`'s "bad arguments" status).

use crate::args::{DirtyLog, Format, OnOff};
use crate::html_report::ReportFile;
use crate::progress::Progress;
use crate::report_pages;
use crate::run_report::{to_json, Text};
use crate::stdout::note;
use crate::stdout::{emit, say};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use vmmu::bugs::BugSet;
use vmmu_sim::host::ReaderFenceKind;
use vmmu_sim::options::parse_seconds;
use vmmu_sim::{GenerationStart, Report, RunMmu, RunOptions, ShadowPages, DEFAULT_SHADOW_PAGES};

/// The host page size behind guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HostPages {
    /// 2 MiB transparent huge pages, but 4 KiB only with `--stress-paths`.
    Auto,
    /// 4 KiB pages only (THP off).
    #[value(name = "4k")]
    Small,
    /// 2 MiB transparent huge pages for every aligned 2 MiB block, also with `--stress-paths`.
    #[value(name = "2m")]
    Huge,
}

/// How often the device manager changes the memslots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Updates {
    /// Like a recorded VM boot: bursts of 12 updates, 600 ms apart (about 20 per second).
    Boot,
    /// Back to back, every 200 us, all run long (over 1000 per second): stress.
    Steady,
}

/// How the MMU's read sections are ordered against memslot updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReaderFences {
    /// A full fence in every read section's entry (the default).
    Full,
    /// Compiler fences in readers; every grace period runs a process-wide `membarrier`.
    Membarrier,
}

/// The machine's options of `vmmu run`.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct MachineArgs {
    /// vCPUs (1..=256; at most 48 with guest paging). Starting and joining their threads is
    /// not counted in `--seconds` (with hundreds of vCPUs it adds about a second).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub vcpus: u16,
    /// How long to run, in seconds (0.01..=3600; with `--compare-caching` each of its runs takes
    /// half, so at least 0.02).
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub seconds: f64,
    /// The MMU and its SPTE format (`shadow` makes the machine's guest run with paging: it implies
    /// `--guest-paging`).
    #[arg(long, value_enum, default_value_t = Format::Ept)]
    pub format: Format,
    /// Host MAXPHYADDR in bits (36..=52).
    #[arg(long = "phys-bits", default_value_t = 46, value_parser = clap::value_parser!(u8).range(36..=52))]
    pub phys_bits: u8,
    /// Cache MMIO in SPTEs (the MMU may still turn it off, and says why in the report).
    #[arg(long = "mmio-caching", value_enum, default_value_t = OnOff::On)]
    pub mmio_caching: OnOff,
    /// Compare MMIO caching on and off: four runs of half `--seconds` each (on, off, off, on).
    #[arg(long = "compare-caching", conflicts_with = "mmio_caching")]
    pub compare_caching: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Seed of the vCPUs' access mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stress the MMU's racy paths: host invalidations (MMU-notifier ranges over live slots,
    /// poisoned while invalidated) between memslot updates; every vCPU hammering the same BAR
    /// and DIMM GPAs while their slots are created, moved and deleted; and, with 3 or more
    /// vCPUs, the last vCPU staying in guest mode on TLB hits until the MMU asks it to leave.
    #[arg(long = "stress-paths")]
    pub stress_paths: bool,
    /// The memslot update profile: `boot` (bursts like a recorded boot, then quiet; the default)
    /// or `steady` (back to back, stress). `--churn`, `--stress-paths`, `--wrap-trap` and
    /// `--inject` imply `steady` (an explicit `--updates boot` with them is refused).
    #[arg(long, value_enum)]
    pub updates: Option<Updates>,
    /// Run the guest with paging: two processes (page-table spaces) per vCPU, accesses through
    /// guest-virtual addresses, a GVA remapped between RAM and MMIO, unmapped GVAs that must
    /// fault, CR3 switches (implied by `--format shadow`; with ept/npt the hardware walks the
    /// guest's tables two-dimensionally).
    #[arg(long = "guest-paging")]
    pub guest_paging: bool,
    /// How the MMU's SRCU read sections (faults' memslot lookups, guest mode) are ordered
    /// against grace periods: a full fence per section entry, or a `membarrier(2)` per grace
    /// period (falls back to full fences where the kernel lacks it). See BENCHMARKS.md.
    #[arg(long = "reader-fences", value_enum, default_value_t = ReaderFences::Full)]
    pub reader_fences: ReaderFences,
}

/// Options of `vmmu run`.
#[derive(Args, Debug)]
// `--seconds -1` is a bad value (named as such), not an unknown flag `-1`.
#[command(allow_negative_numbers = true)]
pub struct RunArgs {
    #[command(flatten)]
    opts: MachineArgs,
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
    /// Delete and move zap everything (KVM's default KVM_X86_QUIRK_SLOT_ZAP_ALL) instead of only
    /// what the slot backs (TDP: its range; shadow paging: its leaves and the shadow pages whose
    /// gfn it holds).
    #[arg(long = "slot-zap-all")]
    slot_zap_all: bool,
    /// Re-inject a historical KVM bug (`--inject list` lists them). Needs a build with
    /// `--features historical-bugs`.
    #[arg(long, value_name = "NAME")]
    inject: Option<String>,
    /// Also write a self-contained HTML report (timeline, latency histograms, configuration)
    /// to this file.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// With `--compare-caching`: run the on, off, off, on sequence this many times (1..=100);
    /// the ratios pool every run, and each round's ratios and their median are printed too.
    #[arg(long, default_value_t = 1, requires = "compare_caching",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Dirty-log the RAM slots while a migration thread collects the log back to back (`auto`:
    /// GET; `manual`: GET then CLEAR; `initially-set`: as manual, logging starting with every
    /// page dirty and nothing write-protected); the oracle checks that every page a vCPU wrote is in a
    /// collection that could see the write (no lost dirty page).
    #[arg(long = "dirty-log", value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "auto")]
    dirty_log: Option<DirtyLog>,
    /// With `--dirty-log`: migrate again and again instead of logging from the start: logging
    /// off for a while, then turned on on the live RAM slots (the MMU write-protects and splits
    /// what is mapped), N collections, a final one, and logging turned off (huge pages
    /// recovered) (1..=1000).
    #[arg(long = "dirty-log-rounds", value_name = "N", requires = "dirty_log",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    dirty_log_rounds: Option<u32>,
    /// The host page size behind guest RAM: `auto` (2 MiB transparent huge pages where a
    /// buffer's block is aligned, 4 KiB only under `--stress-paths`, so that vCPUs race per
    /// page), `4k` or `2m` (huge pages under `--stress-paths` too: the same races on 2 MiB
    /// leaves).
    #[arg(long = "host-pages", value_enum, default_value_t = HostPages::Auto)]
    host_pages: HostPages,
    /// Shadow paging: the shadow MMU's page limit, as a VMM sets it with KVM_SET_NR_MMU_PAGES
    /// (QEMU's `kvm-shadow-mem`, which counts bytes: 4 KiB per page): N pages (at least 64), or
    /// `auto` for KVM's default, 2% of the memslots' pages, which for this machine's few MiB of
    /// RAM is about 80, below what its guest's shadow tables need with MMIO caching on (pages
    /// are recycled all the time: see the README). The default, 1024, is KVM's default for 200
    /// MiB of guest RAM. A limit too small for the vCPUs' roots (each pins its root and up to
    /// 3 previous ones) makes faults fail as KVM's do (`-ENOSPC` from `KVM_RUN`), and the run
    /// fails. Only with `--format shadow`.
    #[arg(long = "shadow-pages", value_name = "N|auto", value_parser = parse_shadow_pages)]
    shadow_pages: Option<ShadowPages>,
}

/// `--shadow-pages`: a page count or `auto`.
fn parse_shadow_pages(s: &str) -> Result<ShadowPages, String> {
    if s == "auto" {
        return Ok(ShadowPages::KvmDefault);
    }
    let n: usize = s.parse().map_err(|e: std::num::ParseIntError| match e.kind() {
        std::num::IntErrorKind::PosOverflow => {
            format!("{s} pages is more than this host can count")
        }
        _ => format!("{s:?} is neither a page count nor `auto`"),
    })?;
    if n < vmmu::shadow::MIN_ALLOC_PAGES {
        return Err(format!(
            "{n} is below {}, the smallest limit KVM accepts (EINVAL from KVM_SET_NR_MMU_PAGES)",
            vmmu::shadow::MIN_ALLOC_PAGES
        ));
    }
    Ok(ShadowPages::Set(n))
}

impl RunArgs {
    /// The engine's options for one run with MMIO caching `caching`.
    /// Whether the run was given `flag` (for the note on an injected bug that went unseen).
    fn has(&self, flag: crate::inject::RunFlag) -> bool {
        use crate::inject::RunFlag;
        match flag {
            RunFlag::StressPaths => self.opts.stress_paths,
            RunFlag::SlotZapAll => self.slot_zap_all,
            RunFlag::WrapTrap => self.wrap_trap,
            RunFlag::DirtyLog => self.dirty_log.is_some(),
            RunFlag::FormatShadow => self.opts.format == Format::Shadow,
        }
    }

    fn options(&self, caching: bool, bugs: BugSet) -> RunOptions {
        let o = &self.opts;
        RunOptions {
            vcpus: o.vcpus,
            seconds: o.seconds,
            mmu: match (o.format, o.guest_paging) {
                (Format::Shadow, _) => RunMmu::Shadow,
                (f, false) => RunMmu::Tdp(f.kind()),
                (f, true) => RunMmu::TdpGuestPaging(f.kind()),
            },
            phys_bits: o.phys_bits,
            mmio_caching: caching,
            seed: o.seed,
            stress_paths: o.stress_paths,
            updates: match o.updates.unwrap_or(Updates::Boot) {
                Updates::Boot => vmmu_sim::UpdateProfile::BOOT,
                Updates::Steady => vmmu_sim::UpdateProfile::Steady,
            },
            churn: self.churn,
            generation: if self.wrap_trap {
                GenerationStart::WrapTrap
            } else if self.near_wrap {
                GenerationStart::NearWrap
            } else {
                GenerationStart::Zero
            },
            slot_zap_all: self.slot_zap_all,
            bugs,
            reader_fences: match o.reader_fences {
                ReaderFences::Full => ReaderFenceKind::Full,
                ReaderFences::Membarrier => ReaderFenceKind::Membarrier,
            },
            timeline: self.report.is_some(),
            dirty_log: self.dirty_log.map(DirtyLog::machine),
            dirty_log_rounds: self.dirty_log_rounds.and_then(std::num::NonZeroU32::new),
            host_pages: match self.host_pages {
                HostPages::Auto => vmmu_sim::HostPages::Auto,
                HostPages::Small => vmmu_sim::HostPages::Small,
                HostPages::Huge => vmmu_sim::HostPages::Huge,
            },
            shadow_pages: self.shadow_pages.unwrap_or(ShadowPages::Set(DEFAULT_SHADOW_PAGES)),
        }
    }

    /// The first option given that runs the memslot updates back to back (implies
    /// `--updates steady`), if any.
    fn implies_steady(&self) -> Option<&'static str> {
        if self.churn.is_some() {
            Some("--churn")
        } else if self.opts.stress_paths {
            Some("--stress-paths")
        } else if self.wrap_trap {
            Some("--wrap-trap")
        } else if self.inject.is_some() {
            Some("--inject")
        } else {
            None
        }
    }

    /// The options as given, for the HTML report: enum values as the flag spells them.
    fn flags(&self) -> Vec<(&'static str, String)> {
        let o = &self.opts;
        let updates = if self.implies_steady().is_some() {
            "steady (implied)".to_string()
        } else {
            flag_value(o.updates.unwrap_or(Updates::Boot))
        };
        vec![
            ("--seconds", o.seconds.to_string()),
            ("--vcpus", o.vcpus.to_string()),
            ("--format", flag_value(o.format)),
            ("--phys-bits", o.phys_bits.to_string()),
            (
                "--mmio-caching",
                if o.compare_caching {
                    "compare (on and off)".into()
                } else {
                    flag_value(o.mmio_caching)
                },
            ),
            ("--seed", o.seed.to_string()),
            ("--reader-fences", flag_value(o.reader_fences)),
            ("--updates", updates),
            ("--churn", self.churn.map_or("none".into(), |n| n.to_string())),
            ("--stress-paths", o.stress_paths.to_string()),
            ("--near-wrap", self.near_wrap.to_string()),
            ("--wrap-trap", self.wrap_trap.to_string()),
            ("--slot-zap-all", self.slot_zap_all.to_string()),
            ("--inject", self.inject.clone().unwrap_or_else(|| "none".into())),
            ("--dirty-log", self.dirty_log.map_or("off".into(), flag_value)),
            ("--dirty-log-rounds", self.dirty_log_rounds.map_or("none".into(), |n| n.to_string())),
            ("--host-pages", flag_value(self.host_pages)),
            (
                "--shadow-pages",
                match self.shadow_pages {
                    None => "none".into(),
                    Some(ShadowPages::KvmDefault) => "auto".into(),
                    Some(ShadowPages::Set(n)) => n.to_string(),
                },
            ),
        ]
        .into_iter()
        .chain(o.compare_caching.then(|| ("--rounds", self.rounds.to_string())))
        .collect()
    }
}

/// An enum flag's value as the flag spells it (`initially-set`, not the variant's name).
fn flag_value<T: ValueEnum>(v: T) -> String {
    v.to_possible_value().map_or_else(|| "?".into(), |p| p.get_name().to_string())
}

/// Writes the HTML report of `runs` if `--report` was given; false (after saying why) if it
/// could not be written.
fn write_report(args: &RunArgs, file: Option<ReportFile>, runs: &[(&str, &Report)]) -> bool {
    let Some(file) = file else { return true };
    let path = file.path().display().to_string();
    match file.write(&report_pages::run_page(&args.flags(), runs)) {
        Ok(()) => {
            note!("vmmu run: report written to {path}");
            true
        }
        Err(e) => {
            note!("vmmu run: {e}");
            false
        }
    }
}

fn one_run(
    args: &RunArgs,
    caching: bool,
    bugs: BugSet,
    show_progress: bool,
) -> Result<Report, String> {
    one_run_with(args.options(caching, bugs), show_progress)
}

fn one_run_with(opts: RunOptions, show_progress: bool) -> Result<Report, String> {
    let progress =
        if show_progress { Progress::for_terminal(opts.duration()) } else { Progress::hidden() };
    let report = opts.run(&mut |snap| progress.update(snap)).map_err(|e| e.to_string())?;
    progress.finish();
    Ok(report)
}

fn per_sec(r: &Report) -> f64 {
    r.total_accesses() as f64 / r.elapsed_seconds.max(1e-9)
}

/// The order of `--compare-caching`'s runs (ABBA): a drift of the machine's speed during the
/// comparison (another tenant, frequency) weighs on both settings alike.
const COMPARE_ORDER: [bool; 4] = [true, false, false, true];

/// Throughput (accesses/s) and MMIO cost (ns per MMIO translation) of some runs taken together.
fn pooled(runs: &[&Report]) -> (f64, f64) {
    let accesses: u64 = runs.iter().map(|r| r.total_accesses()).sum();
    let secs: f64 = runs.iter().map(|r| r.elapsed_seconds).sum();
    let (ns, n) = runs
        .iter()
        .filter_map(|r| r.mmu.extra.as_ref())
        .fold((0u64, 0u64), |a, c| (a.0 + c.mmio_translate_ns, a.1 + c.mmio_translations_timed));
    let cost = if n == 0 { 0.0 } else { ns as f64 / n as f64 };
    (accesses as f64 / secs.max(1e-9), cost)
}

/// The reports of the runs with MMIO caching `caching`.
fn with_caching(runs: &[(bool, Report)], caching: bool) -> Vec<&Report> {
    runs.iter().filter(|(c, _)| *c == caching).map(|(_, r)| r).collect()
}

/// The on-over-off ratios of two [`pooled`] results: throughput, and MMIO cost per exit (off
/// over on).
fn ratios_of((tput_on, ns_on): (f64, f64), (tput_off, ns_off): (f64, f64)) -> (f64, f64) {
    let cost = if ns_on > 0.0 { ns_off / ns_on } else { 0.0 };
    (tput_on / tput_off.max(1e-9), cost)
}

/// The on-over-off ratios of some runs, each setting's runs pooled.
fn ratios(runs: &[(bool, Report)]) -> (f64, f64) {
    ratios_of(pooled(&with_caching(runs, true)), pooled(&with_caching(runs, false)))
}

/// Under shadow paging, when the runs with caching on recycled shadow pages (the VM was over
/// its page limit): how many, against the runs without, and the limit. Caching builds shadow
/// pages for MMIO paths too, so a limit that holds the guest's tables without caching may not
/// hold them with it, and recycling then costs more than caching saves.
fn recycling_note(on: &[&Report], off: &[&Report]) -> Option<String> {
    let recycled = |runs: &[&Report]| -> u64 {
        runs.iter().filter_map(|r| r.mmu.extra.as_ref()).map(|c| c.mmu_recycled).sum()
    };
    let limit = on.first()?.config.shadow_pages?;
    let (r_on, r_off) = (recycled(on), recycled(off));
    (r_on > 0).then(|| {
        let how = crate::run_report::shadow_limit_origin(limit.set);
        format!(
            "shadow pages recycled (over the page limit, {} at the end, {how}): {r_on} with \
             caching, {r_off} without; every recycled page is rebuilt by a later fault \
             (--shadow-pages N raises the limit)",
            limit.limit
        )
    })
}

/// The median of `v` (0 if empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `--compare-caching`: `--rounds` times four runs of half `--seconds` each, caching on, off,
/// off, on; the ratios pool each setting's runs. The first run of each setting is printed in
/// full.
fn compare_caching(args: &RunArgs, bugs: BugSet, report_file: Option<ReportFile>) -> ExitCode {
    let json = args.opts.json;
    let mut runs: Vec<(bool, Report)> = Vec::new();
    for _ in 0..args.rounds {
        for caching in COMPARE_ORDER {
            let mut opts = args.options(caching, bugs);
            opts.seconds /= 2.0;
            match one_run_with(opts, !json) {
                Ok(r) => runs.push((caching, r)),
                Err(e) => {
                    note!("vmmu run: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    let (on_runs, off_runs) = (with_caching(&runs, true), with_caching(&runs, false));
    let ((tput_on, ns_on), (tput_off, ns_off)) = (pooled(&on_runs), pooled(&off_runs));
    let (tput_ratio, cost_ratio) = ratios_of((tput_on, ns_on), (tput_off, ns_off));
    let rounds: Vec<(f64, f64)> = runs.chunks(COMPARE_ORDER.len()).map(ratios).collect();
    // Each half of each round on its own: (on, off) and (off, on).
    let halves: Vec<f64> = runs
        .chunks(COMPARE_ORDER.len())
        .flat_map(|c| [(&c[0].1, &c[1].1), (&c[3].1, &c[2].1)])
        .map(|(on, off)| per_sec(on) / per_sec(off).max(1e-9))
        .collect();
    let tput_median = median(rounds.iter().map(|r| r.0).collect());
    let cost_median = median(rounds.iter().map(|r| r.1).collect());
    let (on, off) = (on_runs[0], off_runs[0]);
    // The MMU may turn caching off whatever was asked (no reserved bit for MMIO SPTEs with
    // MAXPHYADDR 52 under NPT or shadow paging): then both settings ran the same path, and a
    // ratio would compare noise with noise.
    let in_effect = on_runs.iter().all(|r| r.config.mmio_caching.effective);
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(",");
    let mut printed = true;
    if json {
        let (t, c): (Vec<f64>, Vec<f64>) = rounds.iter().copied().unzip();
        printed &= say!(
            "run",
            "{{\"caching_on\":{},\"caching_off\":{},\"caching_in_effect\":{in_effect},\"ratios\":{{\"mmio_ns_per_exit_on\":{:.1},\"mmio_ns_per_exit_off\":{:.1},\"mmio_cost_off_over_on\":{:.3},\"throughput_on_over_off\":{:.3},\"throughput_on_over_off_halves\":[{}],\"rounds\":{{\"throughput_on_over_off\":[{}],\"mmio_cost_off_over_on\":[{}],\"throughput_median\":{:.3},\"mmio_cost_median\":{:.3}}}}}}}",
            to_json(on),
            to_json(off),
            ns_on,
            ns_off,
            cost_ratio,
            tput_ratio,
            list(&halves),
            list(&t),
            list(&c),
            tput_median,
            cost_median
        );
    } else {
        printed &=
            say!("run", "== MMIO caching on\n{}\n== MMIO caching off\n{}", Text(on), Text(off));
        let halves: Vec<String> = halves.iter().map(|h| format!("{h:.2}x")).collect();
        if !in_effect {
            printed &= say!(
                "run",
                "compare: nothing to compare: MMIO caching was asked for but not in effect ({}), \
                 so both settings took the uncached path ({ns_on:.0} and {ns_off:.0} ns/exit, \
                 {tput_on:.0} and {tput_off:.0} accesses/s: the difference is noise)",
                on.config.mmio_caching.reason
            );
        } else {
            printed &= say!(
                "run",
                "compare ({} of runs on, off, off, on of {} s each; each setting's runs pooled): \
                 MMIO handling {ns_on:.0} ns/exit with caching, {ns_off:.0} ns without \
                 ({cost_ratio:.2}x); throughput {tput_on:.0} vs {tput_off:.0} accesses/s \
                 ({tput_ratio:.2}x; {} in the halves)",
                if args.rounds == 1 {
                    "one round".to_string()
                } else {
                    format!("{} rounds", args.rounds)
                },
                args.opts.seconds / 2.0,
                halves.join(", "),
            );
            if let Some(note) = recycling_note(&on_runs, &off_runs) {
                printed &= say!("run", "{note}");
            }
            if args.rounds > 1 {
                let each = |f: fn(&(f64, f64)) -> f64| -> String {
                    rounds.iter().map(|r| format!("{:.2}x", f(r))).collect::<Vec<_>>().join(" ")
                };
                printed &= say!(
                    "run",
                    "rounds: throughput {} (median {tput_median:.2}x); cost per MMIO exit, off \
                     over on, {} (median {cost_median:.2}x)",
                    each(|r| r.0),
                    each(|r| r.1)
                );
            }
        }
    }
    let failed = runs.iter().filter(|(_, r)| !passed(r)).count();
    let missed: Vec<&Report> =
        runs.iter().map(|(_, r)| r).filter(|r| r.memslots.wrap_trap.missed()).collect();
    if let Some(first) = missed.first() {
        let when = format!("in {} of the runs, so they did not test it", missed.len());
        note_trap_missed(args, &when, first);
    }
    let names: Vec<String> = runs
        .iter()
        .enumerate()
        .map(|(i, (caching, _))| {
            let (round, k) = (i / COMPARE_ORDER.len() + 1, i % COMPARE_ORDER.len());
            let setting = if *caching { "on" } else { "off" };
            let nth = if k < 2 { 1 } else { 2 };
            if args.rounds == 1 {
                format!("MMIO caching {setting} ({nth} of 2)")
            } else {
                format!("MMIO caching {setting} (round {round}, {nth} of 2)")
            }
        })
        .collect();
    let named: Vec<(&str, &Report)> =
        runs.iter().zip(&names).map(|((_, r), name)| (name.as_str(), r)).collect();
    let written = write_report(args, report_file, &named);
    note_page_limit(args, &runs.iter().map(|(_, r)| r).collect::<Vec<_>>());
    if failed == 0 {
        note_unseen(args, bugs, &on_runs);
    }
    if failed == 0 && written && printed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Says on stderr, when shadow page faults failed at the page limit in `runs`, that the limit
/// is too small for the vCPUs (their accesses failed, and so did the run: KVM's `-ENOSPC` from
/// `KVM_RUN`), and what raises it.
fn note_page_limit(args: &RunArgs, runs: &[&Report]) {
    let failures: u64 = runs
        .iter()
        .filter_map(|r| r.mmu.extra.as_ref())
        .map(|c| c.shadow_page_limit_failures)
        .sum();
    let Some(limit) = runs.first().and_then(|r| r.config.shadow_pages) else { return };
    if failures == 0 {
        return;
    }
    let how = if limit.set { "--shadow-pages" } else { "--shadow-pages auto, KVM's default" };
    note!(
        "vmmu run: {failures} shadow page faults or root loads failed at the page limit ({} \
         pages, {how}): the {} vCPUs' roots (each pins its root and up to {} previous ones) held \
         every page, so nothing could be recycled (KVM: -ENOSPC from KVM_RUN); give a larger \
         --shadow-pages, or fewer --vcpus",
        limit.limit,
        args.opts.vcpus,
        vmmu::vcpu::NUM_PREV_ROOTS
    );
}

/// Says on stderr why an injected bug went unseen in runs that all passed (`runs`: those with
/// MMIO caching asked for, whose shape decides what the machine could show).
fn note_unseen(args: &RunArgs, bugs: BugSet, runs: &[&Report]) {
    let Some(bug) = vmmu::bugs::Bug::ALL.into_iter().find(|&b| bugs.has(b)) else { return };
    let shape = crate::inject::RunShape {
        caching: runs.iter().all(|r| r.config.mmio_caching.effective),
        vcpus: args.opts.vcpus,
    };
    note!("vmmu run: {}", crate::inject::unseen_note(bug, |f| args.has(f), shape));
}

/// Whether a run passed: no oracle violation, no vCPU access that ended in an error, and a
/// `--wrap-trap` that sprang (a run that did not test what it was asked to fails).
fn passed(report: &Report) -> bool {
    report.oracle.violations == 0
        && report.vcpus.iter().all(|v| v.errors == 0)
        && !report.memslots.wrap_trap.missed()
}

/// Says on stderr that a `--wrap-trap` did not spring (`when`), and what ended `run` first:
/// `--churn`'s count of updates, or `--seconds` (the trap's 2^19 dummy swaps take longer with
/// more vCPUs to pause).
fn note_trap_missed(args: &RunArgs, when: &str, run: &Report) {
    let t = &run.memslots.wrap_trap;
    let why = match args.churn {
        Some(n) => format!(
            "--churn {n} ended the run after {} of the trap's dummy swaps; drop --churn (the \
             trap makes its own swaps, about 2^19 of them)",
            t.swaps
        ),
        None => format!(
            "the run's time ran out after {:.2} s and {} of the trap's dummy swaps (about 2^19 \
             are needed); give a longer --seconds",
            run.elapsed_seconds, t.swaps
        ),
    };
    note!("vmmu run: --wrap-trap: the trap did not spring {when}: {why}");
}

/// Why an explicit `--updates boot` cannot be had: an option given with it runs the updates back
/// to back (`steady`), which used to override it without a word.
fn boot_updates_overridden(args: &RunArgs) -> Option<String> {
    if args.opts.updates != Some(Updates::Boot) {
        return None;
    }
    let by = args.implies_steady()?;
    Some(format!(
        "--updates boot and {by} exclude each other: {by} runs the memslot updates back to back \
         (--updates steady); drop --updates boot"
    ))
}

/// Why `--compare-caching` cannot run with these `--seconds`: each of its runs takes half, and
/// a run shorter than the machine's shortest (`MIN_SECONDS`) gives ratios of noise (`--seconds
/// 0.01` printed a throughput half of "0.00x").
fn compare_too_short(args: &RunArgs) -> Option<String> {
    let min = vmmu_sim::options::MIN_SECONDS;
    (args.opts.compare_caching && args.opts.seconds / 2.0 < min).then(|| {
        format!(
            "--compare-caching --seconds {}: each of its runs takes half of --seconds, and the \
             shortest run is {min} s; give --seconds {} or more",
            args.opts.seconds,
            2.0 * min
        )
    })
}

/// Why `--shadow-pages` cannot be had: the limit is the shadow MMU's, and the other formats
/// have none (it was accepted and ignored).
fn shadow_pages_without_shadow(args: &RunArgs) -> Option<String> {
    (args.shadow_pages.is_some() && args.opts.format != Format::Shadow).then(|| {
        format!(
            "--shadow-pages sets the shadow MMU's page limit, and --format {} has no shadow MMU: \
             give --format shadow, or drop --shadow-pages",
            flag_value(args.opts.format)
        )
    })
}

/// Runs `vmmu run`.
pub fn run(args: &RunArgs) -> ExitCode {
    if args.inject.as_deref() == Some("list") {
        let list = crate::inject::listing(args.opts.json);
        return if emit("run", &list) { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    if let Err(e) = args.options(true, BugSet::NONE).validate() {
        note!("vmmu run: {e}");
        return ExitCode::from(2);
    }
    if let Some(e) = boot_updates_overridden(args) {
        note!("vmmu run: {e}");
        return ExitCode::from(2);
    }
    if let Some(e) = shadow_pages_without_shadow(args) {
        note!("vmmu run: {e}");
        return ExitCode::from(2);
    }
    if let Some(e) = compare_too_short(args) {
        note!("vmmu run: {e}");
        return ExitCode::from(2);
    }
    let bugs = match crate::inject::bug_set(args.inject.as_deref(), "run") {
        Ok(b) => b,
        Err(e) => {
            note!("vmmu run: {e}");
            return ExitCode::from(2);
        }
    };
    let report_file = match args.report.as_deref().map(ReportFile::create).transpose() {
        Ok(f) => f,
        Err(e) => {
            note!("vmmu run: {e}");
            return ExitCode::from(2);
        }
    };
    let json = args.opts.json;
    if args.opts.compare_caching {
        return compare_caching(args, bugs, report_file);
    }
    let caching = args.opts.mmio_caching == OnOff::On;
    match one_run(args, caching, bugs, !json) {
        Ok(report) => {
            let printed = if json {
                say!("run", "{}", to_json(&report))
            } else {
                say!("run", "{}", Text(&report))
            };
            let written = write_report(args, report_file, &[("run", &report)]);
            if report.memslots.wrap_trap.missed() {
                note_trap_missed(args, "before the run ended, so the run did not test it", &report);
            }
            note_page_limit(args, &[&report]);
            if report.memslots.updates == 0 {
                note!(
                    "vmmu run: the device manager made no memslot update in this run ({} vCPUs, \
                     {:.2} s), so no access was judged against a memslot change; give fewer \
                     --vcpus or a longer --seconds",
                    args.opts.vcpus,
                    report.elapsed_seconds
                );
            }
            if args.near_wrap && report.memslots.generation_wraps == 0 {
                note!(
                    "vmmu run: --near-wrap: the run's {} memslot updates did not reach the wrap \
                     ({} generations below it at the start); give --updates steady or --churn \
                     (back to back updates), or a longer --seconds",
                    report.memslots.updates,
                    vmmu_sim::options::NEAR_WRAP_MARGIN
                );
            }
            if passed(&report) {
                note_unseen(args, bugs, &[&report]);
            }
            if printed && written && passed(&report) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            note!("vmmu run: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The flag the unseen-bug note suggests is one `vmmu run` takes, and a run given it is
    /// told "a race" rather than to add it.
    #[test]
    fn the_flags_an_unseen_bug_note_suggests_are_run_flags() {
        use crate::inject::{run_catch, RunCatch};
        for bug in vmmu::bugs::Bug::ALL {
            if let RunCatch::With(flag) = run_catch(bug) {
                let words: Vec<&str> = flag.name().split(' ').collect();
                let a = parse(&[&["--inject", bug.name()][..], &words].concat()).expect("flags");
                assert!(a.has(flag), "{bug}: {}", flag.name());
                assert!(!parse(&[]).expect("flags").has(flag), "{}", flag.name());
            }
        }
    }

    #[test]
    fn median_of_odd_even_and_empty_lists() {
        assert_eq!(median(vec![1.2, 0.9, 1.0]), 1.0);
        assert_eq!(median(vec![1.2, 0.9, 1.0, 1.1]), 1.05);
        assert_eq!(median(vec![]), 0.0);
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmmu").chain(args.iter().copied())).map(|c| c.run)
    }

    #[test]
    fn defaults_match_the_issue() {
        let a = parse(&[]).expect("defaults");
        assert_eq!(a.options(true, BugSet::NONE), RunOptions::default());
        let c = a.options(true, BugSet::NONE).machine_config().expect("config");
        assert_eq!(
            (c.vcpus, c.duration, c.host.phys_bits),
            (2, std::time::Duration::from_secs(5), 46)
        );
    }

    #[test]
    fn every_flag_parses() {
        let a = parse(&[
            "--vcpus",
            "4",
            "--seconds",
            "0.5",
            "--format",
            "npt",
            "--phys-bits",
            "52",
            "--mmio-caching",
            "off",
            "--json",
            "--seed",
            "9",
            "--stress-paths",
            "--churn",
            "10",
            "--slot-zap-all",
        ])
        .expect("flags");
        let o = &a.opts;
        assert!(o.stress_paths);
        assert_eq!((o.vcpus, o.seconds, o.format, o.phys_bits), (4, 0.5, Format::Npt, 52));
        assert_eq!((o.mmio_caching, o.json, o.seed), (OnOff::Off, true, 9));
        let r = a.options(false, BugSet::NONE);
        assert!(r.stress_paths && r.slot_zap_all && !r.mmio_caching);
        assert_eq!((r.mmu, r.churn), (RunMmu::Tdp(vmmu::spte::FormatKind::Npt), Some(10)));
        let mmu = |args: &[&str]| parse(args).expect("flags").options(true, BugSet::NONE).mmu;
        assert_eq!(mmu(&["--format", "shadow"]), RunMmu::Shadow);
        assert_eq!(mmu(&["--format", "shadow", "--guest-paging"]), RunMmu::Shadow);
        let ept = vmmu::spte::FormatKind::Ept;
        assert_eq!(mmu(&["--guest-paging"]), RunMmu::TdpGuestPaging(ept));
        let generation =
            |args: &[&str]| parse(args).expect("flags").options(true, BugSet::NONE).generation;
        assert_eq!(generation(&[]), GenerationStart::Zero);
        assert_eq!(generation(&["--near-wrap"]), GenerationStart::NearWrap);
        assert_eq!(generation(&["--wrap-trap"]), GenerationStart::WrapTrap);
        assert!(parse(&["--wrap-trap", "--near-wrap"]).is_err());
        assert!(r.machine_config().expect("config").stress_paths);
        assert!(parse(&["--compare-caching"]).expect("compare").opts.compare_caching);
        let fences = |args: &[&str]| {
            let o = parse(args).expect("flags").options(true, BugSet::NONE);
            o.machine_config().expect("config").host.reader_fences
        };
        assert_eq!(fences(&[]), ReaderFenceKind::Full);
        assert_eq!(fences(&["--reader-fences", "membarrier"]), ReaderFenceKind::Membarrier);
        assert!(parse(&["--reader-fences", "none"]).is_err());
    }

    /// An explicit `--updates boot` with an option that implies `steady` is refused, naming the
    /// option; without `--updates`, or with `steady`, those options run as before.
    #[test]
    fn explicit_boot_updates_are_not_overridden_silently() {
        let refused = |args: &[&str]| boot_updates_overridden(&parse(args).expect("parses"));
        for (flag, args) in [
            ("--churn", &["--updates", "boot", "--churn", "10"][..]),
            ("--stress-paths", &["--stress-paths", "--updates", "boot"][..]),
            ("--wrap-trap", &["--updates", "boot", "--wrap-trap"][..]),
            ("--inject", &["--updates", "boot", "--inject", "no-tlb-flush-on-zap"][..]),
        ] {
            let e = refused(args).expect("refused");
            assert!(e.contains(flag) && e.contains("drop --updates boot"), "{args:?}: {e}");
        }
        assert_eq!(refused(&["--churn", "10"]), None);
        assert_eq!(refused(&["--updates", "steady", "--stress-paths"]), None);
        assert_eq!(refused(&["--updates", "boot"]), None);
        assert_eq!(parse(&[]).expect("defaults").opts.updates, None);
    }

    /// `--compare-caching` halves `--seconds` per run: below twice the shortest run it is a
    /// bad argument, not four runs too short to time (`--seconds 0.01` printed "0.00x").
    #[test]
    fn compare_caching_needs_two_shortest_runs() {
        let too_short = |args: &[&str]| compare_too_short(&parse(args).expect("parses"));
        let e = too_short(&["--compare-caching", "--seconds", "0.01"]).expect("refused");
        assert!(e.contains("give --seconds 0.02 or more"), "{e}");
        assert_eq!(too_short(&["--compare-caching", "--seconds", "0.02"]), None);
        assert_eq!(too_short(&["--seconds", "0.01"]), None);
    }

    #[test]
    fn the_report_names_every_option_that_implies_steady_updates() {
        let updates = |args: &[&str]| {
            let a = parse(args).expect("flags");
            a.flags().into_iter().find(|(k, _)| *k == "--updates").map(|(_, v)| v)
        };
        assert_eq!(updates(&[]).as_deref(), Some("boot"));
        assert_eq!(updates(&["--updates", "steady"]).as_deref(), Some("steady"));
        for implies in
            [&["--churn", "5"][..], &["--stress-paths"], &["--wrap-trap"], &["--inject", "x"]]
        {
            assert_eq!(updates(implies).as_deref(), Some("steady (implied)"), "{implies:?}");
        }
    }

    #[test]
    fn host_pages_default_to_auto_and_name_their_size() {
        let pages = |args: &[&str]| {
            let a = parse(args).expect("flags");
            let shown = a.flags().into_iter().find(|(k, _)| *k == "--host-pages").map(|(_, v)| v);
            (a.options(true, BugSet::NONE).machine_config().expect("config").host_pages, shown)
        };
        assert_eq!(pages(&[]), (vmmu_sim::HostPages::Auto, Some("auto".into())));
        assert_eq!(pages(&["--host-pages", "4k"]), (vmmu_sim::HostPages::Small, Some("4k".into())));
        assert_eq!(
            pages(&["--host-pages", "2m", "--stress-paths"]),
            (vmmu_sim::HostPages::Huge, Some("2m".into()))
        );
        assert!(parse(&["--host-pages", "1g"]).is_err());
    }

    #[test]
    fn dirty_log_takes_an_optional_mode() {
        use vmmu_sim::migration::DirtyLogMode;
        let mode =
            |args: &[&str]| parse(args).expect("flags").options(true, BugSet::NONE).dirty_log;
        assert_eq!(mode(&[]), None);
        assert_eq!(mode(&["--dirty-log"]), Some(DirtyLogMode::Auto));
        assert_eq!(mode(&["--dirty-log", "manual"]), Some(DirtyLogMode::Manual));
        assert_eq!(mode(&["--dirty-log=auto", "--vcpus", "3"]), Some(DirtyLogMode::Auto));
        let e = parse(&["--dirty-log", "sometimes"]).expect_err("bad mode");
        assert!(e.to_string().contains("auto") && e.to_string().contains("manual"), "{e}");
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (args, needle) in [
            (&["--phys-bits", "35"][..], "36..=52"),
            (&["--phys-bits", "53"][..], "36..=52"),
            (&["--vcpus", "0"][..], "1..=256"),
            (&["--seconds", "0"][..], "above 0"),
            (&["--seconds", "x"][..], "not a number"),
            (&["--format", "vmx"][..], "vmx"),
            (&["--compare-caching", "--mmio-caching", "off"][..], "cannot be used with"),
            (&["--wrap-trap", "--near-wrap"][..], "cannot be used with"),
        ] {
            let e = parse(args).expect_err("must fail");
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }
}
