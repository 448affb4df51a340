//! `vmmu selftest NAME...`: KVM's memslot selftests restated, on the software machine and on
//! `/dev/kvm`, side by side with the figures published for KVM (`memslot_perf_test`, Maciej S.
//! Szmigiero's "KVM: Scalable memslots implementation" v4, "after" column, at the nearest slot
//! count). The engines are `vmmu_sim::selftest` and `vmmu_kvm::selftest`; this module parses,
//! runs and prints.
//!
//! Exit status: 0 when every test that ran passed (a KVM half skipped because `/dev/kvm` is not
//! usable, or a test the slot cap leaves no room for, as the C test reports it, is not a
//! failure); 1 when a test failed (the row says what was seen); 2 on bad arguments.

use crate::args::{DirtyLog, Format};
use crate::stdout::emit;
use crate::stdout::note;
use clap::Args;
use std::process::ExitCode;
use std::time::Duration;
use vmmu_selftest::perf::{self as perf, PerfTest, Sizes};
use vmmu_selftest::{dirty_log_perf as dlp, set_memory_region as smr, stress, SelftestError};
use vmmu_sim::selftest::{MmuChoice, SelftestMmu};

/// One test (`vmmu selftest --list` names them), in the C tests' order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    /// set_memory_region_test MOVE.
    SetMemoryRegionMove,
    /// set_memory_region_test DELETE.
    SetMemoryRegionDelete,
    /// memslot_modification_stress_test.
    MemslotModificationStress,
    /// dirty_log_perf_test.
    DirtyLogPerf,
    /// One of memslot_perf_test's six tests.
    MemslotPerf(PerfTest),
}

impl Test {
    /// Every test, in the C tests' order (the sixth perf test, RW, last).
    const ALL: [Test; 10] = [
        Test::SetMemoryRegionMove,
        Test::SetMemoryRegionDelete,
        Test::MemslotModificationStress,
        Test::DirtyLogPerf,
        Test::MemslotPerf(PerfTest::Map),
        Test::MemslotPerf(PerfTest::Unmap),
        Test::MemslotPerf(PerfTest::UnmapChunked),
        Test::MemslotPerf(PerfTest::MoveActive),
        Test::MemslotPerf(PerfTest::MoveInactive),
        Test::MemslotPerf(PerfTest::Rw),
    ];

    /// Its name on the command line and in reports.
    const fn name(self) -> &'static str {
        match self {
            Test::SetMemoryRegionMove => "set-memory-region-move",
            Test::SetMemoryRegionDelete => "set-memory-region-delete",
            Test::MemslotModificationStress => "memslot-modification-stress",
            Test::DirtyLogPerf => "dirty-log-perf",
            Test::MemslotPerf(PerfTest::Map) => "memslot-perf-map",
            Test::MemslotPerf(PerfTest::Unmap) => "memslot-perf-unmap",
            Test::MemslotPerf(PerfTest::UnmapChunked) => "memslot-perf-unmap-chunked",
            Test::MemslotPerf(PerfTest::MoveActive) => "memslot-perf-move-active",
            Test::MemslotPerf(PerfTest::MoveInactive) => "memslot-perf-move-inactive",
            Test::MemslotPerf(PerfTest::Rw) => "memslot-perf-rw",
        }
    }

    /// What it does (`--list`).
    const fn description(self) -> &'static str {
        match self {
            Test::SetMemoryRegionMove => {
                "set_memory_region_test MOVE: a slot the guest spins on moves away and back; \
                 never stale"
            }
            Test::SetMemoryRegionDelete => {
                "set_memory_region_test DELETE: delete/re-create/delete an in-use slot, then the \
                 code slot"
            }
            Test::MemslotModificationStress => {
                "memslot_modification_stress_test: vCPUs write while a 1-page slot is added and \
                 deleted"
            }
            Test::DirtyLogPerf => {
                "dirty_log_perf_test: populate, enable dirty logging, dirty/get/clear iterations, \
                 disable"
            }
            Test::MemslotPerf(PerfTest::Map) => {
                "memslot_perf_test 0 map: fault-in across many slots while unmapping"
            }
            Test::MemslotPerf(PerfTest::Unmap) => {
                "memslot_perf_test 1 unmap: MADV_DONTNEED 4 KiB at a time"
            }
            Test::MemslotPerf(PerfTest::UnmapChunked) => {
                "memslot_perf_test 2 unmap chunked: in 2 MiB chunks"
            }
            Test::MemslotPerf(PerfTest::MoveActive) => {
                "memslot_perf_test 3 move active area: move the slot the guest writes (MMIO \
                 allowed)"
            }
            Test::MemslotPerf(PerfTest::MoveInactive) => {
                "memslot_perf_test 4 move inactive area: move a slot the guest does not touch"
            }
            Test::MemslotPerf(PerfTest::Rw) => {
                "memslot_perf_test 5 RW: guest and host write and verify every page"
            }
        }
    }

    /// The memslot_perf_test test it is, if it is one.
    const fn perf(self) -> Option<PerfTest> {
        match self {
            Test::MemslotPerf(t) => Some(t),
            _ => None,
        }
    }
}

/// A group of tests (`--list` names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// Every test.
    All,
    /// set-memory-region-move and -delete.
    SetMemoryRegion,
    /// The six memslot_perf_test tests.
    MemslotPerf,
}

impl Group {
    /// Every group.
    const ALL: [Group; 3] = [Group::All, Group::SetMemoryRegion, Group::MemslotPerf];

    /// Its name on the command line.
    const fn name(self) -> &'static str {
        match self {
            Group::All => "all",
            Group::SetMemoryRegion => "set-memory-region",
            Group::MemslotPerf => "memslot-perf",
        }
    }

    /// What it holds (`--list`).
    const fn description(self) -> &'static str {
        match self {
            Group::All => "every test",
            Group::SetMemoryRegion => "set-memory-region-move and -delete",
            Group::MemslotPerf => "the six memslot_perf_test tests",
        }
    }

    /// Whether `t` belongs to it.
    const fn holds(self, t: Test) -> bool {
        match self {
            Group::All => true,
            Group::SetMemoryRegion => {
                matches!(t, Test::SetMemoryRegionMove | Test::SetMemoryRegionDelete)
            }
            Group::MemslotPerf => matches!(t, Test::MemslotPerf(_)),
        }
    }
}

/// Options of `vmmu selftest`.
#[derive(Args, Debug)]
// `--seconds -1` is a bad value (named as such), not an unknown flag `-1`.
#[command(allow_negative_numbers = true)]
pub struct SelftestArgs {
    /// Tests or groups to run (`--list` names them).
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// List the tests and groups (it runs nothing, so it takes no names).
    #[arg(long, conflicts_with = "names")]
    list: bool,
    /// Small sizes and short runs (for CI): 1 loop, 64 slots, 0.2 s per perf run, 1/16 of the
    /// perf memory, 16 MiB per stress or dirty-log vCPU; explicit flags still win.
    #[arg(long)]
    quick: bool,
    /// Do not run on /dev/kvm.
    #[arg(long = "no-kvm")]
    no_kvm: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// The software machine's MMU: the TDP MMU with EPT or NPT SPTEs, or the shadow MMU (as
    /// `/dev/kvm` on a nested host), whose guests reach their memory through identity maps.
    #[arg(long, value_enum, default_value_t = Format::Ept)]
    format: Format,
    /// set_memory_region_test loops (its argv[1]; 1..=10000, default 10).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10000))]
    loops: Option<u32>,
    /// memslot_perf_test -s: slot cap, 2..=32764 (default: the maximum).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=32764))]
    slots: Option<u32>,
    /// memslot_perf_test -l: seconds per run (0.01..=3600, default 5).
    #[arg(long, value_parser = vmmu_sim::options::parse_seconds)]
    seconds: Option<f64>,
    /// memslot_perf_test -r: runs per test, the best reported (1..=100, default 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// memslot_modification_stress_test and dirty_log_perf_test -v: vCPUs (1..=64, default 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    vcpus: u16,
    /// memslot_modification_stress_test and dirty_log_perf_test -b: MiB per vCPU, 1..=16384
    /// (default 1024; all vCPUs together at most 32767 MiB for the stress test, 61440 for
    /// dirty-log-perf, or 524288 with --no-kvm).
    #[arg(long = "mib-per-vcpu", value_parser = clap::value_parser!(u64).range(1..=16384))]
    mib_per_vcpu: Option<u64>,
    /// memslot_modification_stress_test -i: add/delete iterations (1..=100000000, default 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    iterations: u64,
    /// memslot_modification_stress_test -d: microseconds before each iteration (0..=10000000,
    /// default 0).
    #[arg(long = "delay-us", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    delay_us: u64,
    /// dirty_log_perf_test -i: iterations (2..=1000, default 2).
    #[arg(long = "dirty-iterations", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(2..=1000))]
    dirty_iterations: u32,
    /// dirty_log_perf_test's collection: `initially-set` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with
    /// KVM_DIRTY_LOG_INITIALLY_SET, GET then CLEAR; the C test's default), `manual` (without
    /// "initially set": enabling logging write-protects) or `auto` (its -g: GET clears and
    /// re-protects).
    #[arg(long = "dirty-log", value_enum, default_value_t = DirtyLog::InitiallySet)]
    dirty_log: DirtyLog,
    /// Re-inject a historical KVM bug into the software machine's MMU (a build with
    /// `--features historical-bugs`): shows which selftests catch it (`--inject list` lists them).
    #[arg(long, value_name = "BUG")]
    inject: Option<String>,
}

/// One side's result of one test.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    /// Passed: the figures, short (for the table) and in full.
    Pass(String, String),
    /// The slot cap leaves no room (the C test says so and goes on).
    NotRun(String),
    /// Not run here (no /dev/kvm, `--no-kvm`).
    Skipped(String),
    /// Failed: what was seen.
    Fail(String),
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Pass(_, s) => format!("ok: {s}"),
            Cell::NotRun(s) => format!("not run: {s}"),
            Cell::Skipped(s) => format!("skipped: {s}"),
            Cell::Fail(s) => format!("FAIL: {s}"),
        }
    }
    fn short(&self) -> String {
        match self {
            Cell::Pass(s, _) => s.clone(),
            Cell::NotRun(_) => "not run".into(),
            Cell::Skipped(_) => "skipped".into(),
            Cell::Fail(_) => "FAIL".into(),
        }
    }

    fn status(&self) -> &'static str {
        match self {
            Cell::Pass(..) => "pass",
            Cell::NotRun(_) => "not-run",
            Cell::Skipped(_) => "skipped",
            Cell::Fail(_) => "fail",
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug)]
struct Row {
    test: Test,
    sim: Cell,
    kvm: Cell,
    /// Per-iteration time (perf tests), for the ratio.
    sim_iter: Option<Duration>,
    kvm_iter: Option<Duration>,
    published: String,
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

/// Maciej S. Szmigiero's v4 figures ("after", seconds per iteration) at 10, 30, 50, 100, 509
/// and 32k slots (map: 8194), per test index, and slot setup.
const PUBLISHED_SLOTS: [u32; 6] = [10, 30, 50, 100, 509, 32764];
const PUBLISHED: [[f64; 6]; 5] = [
    [0.0186, 0.0190, 0.0190, 0.0191, 0.0223, 0.0541],
    [0.0310, 0.0310, 0.0311, 0.0312, 0.0315, 0.0351],
    [0.000351, 0.000373, 0.000395, 0.000447, 0.000869, 0.0348],
    [0.0000948, 0.0000865, 0.0000854, 0.0000800, 0.0000792, 0.0000786],
    [0.0000933, 0.0000918, 0.0000826, 0.0000840, 0.0000847, 0.0000880],
];
const PUBLISHED_SETUP: [f64; 6] = [0.000283, 0.000775, 0.000990, 0.00174, 0.00803, 0.59];

fn published_index(slots: u32) -> usize {
    let mut best = 0;
    for (i, &s) in PUBLISHED_SLOTS.iter().enumerate() {
        if (f64::from(s).ln() - f64::from(slots).ln()).abs()
            < (f64::from(PUBLISHED_SLOTS[best]).ln() - f64::from(slots).ln()).abs()
        {
            best = i;
        }
    }
    best
}

fn published(test: PerfTest, slots: u32) -> String {
    let i = published_index(slots);
    let shown = if PUBLISHED_SLOTS[i] == 32764 {
        if test == PerfTest::Map {
            "32k (run with 8194)".to_string()
        } else {
            "32k".to_string()
        }
    } else {
        PUBLISHED_SLOTS[i].to_string()
    };
    let row = match test {
        PerfTest::Map => 0,
        PerfTest::Unmap => 1,
        PerfTest::UnmapChunked => 2,
        PerfTest::MoveActive => 3,
        PerfTest::MoveInactive => 4,
        PerfTest::Rw => return "none published".into(),
    };
    format!(
        "{} per iteration at {shown} slots, full-size test",
        secs(Duration::from_secs_f64(PUBLISHED[row][i]))
    )
}

/// The most stress memory (all vCPUs, MiB) the KVM half takes: 32 GiB less two pages.
const KVM_STRESS_MIB: u64 = 32 * 1024 - 1;
/// The most the software machine alone takes (its host has 2^28 frames, 1 TiB).
const SIM_STRESS_MIB: u64 = 512 * 1024;
/// The most dirty-log-perf memory the KVM half takes: from 4 GiB to the top of its 64 GiB map.
const KVM_DIRTY_MIB: u64 = 60 * 1024;

/// Resolved parameters.
struct Plan {
    mmu: MmuChoice,
    loops: u32,
    perf: perf::Params,
    stress: stress::Params,
    dirty: dlp::Params,
    /// dirty-log-perf's collection (as `dirty.protect`), for the published figures.
    dirty_log: DirtyLog,
    kvm: bool,
}

impl SelftestArgs {
    /// The parameters; `stress`, `dirty`: whether the stress test, dirty-log-perf run (their
    /// memory is checked then).
    fn plan(&self, stress: bool, dirty: bool) -> Result<Plan, String> {
        let q = self.quick;
        let mib = self.mib_per_vcpu.unwrap_or(if q { 16 } else { 1024 });
        let total = mib * u64::from(self.vcpus);
        // The tests' memory, all vCPUs together: the KVM half's guest maps 64 GiB and puts the
        // stress memory in the top half (less two pages), dirty-log-perf's from 4 GiB up; the
        // software machine's host has 2^28 frames.
        for (on, what, kvm_limit) in
            [(stress, "stress", KVM_STRESS_MIB), (dirty, "dirty-log-perf", KVM_DIRTY_MIB)]
        {
            let (limit, why) = if self.no_kvm {
                (SIM_STRESS_MIB, "the software machine's host frames".to_string())
            } else {
                (kvm_limit, "the KVM half's guest maps 64 GiB; --no-kvm allows 512 GiB".into())
            };
            if on && total > limit {
                return Err(format!(
                    "--vcpus {} x --mib-per-vcpu {mib} = {total} MiB of {what} memory: at most \
                     {limit} MiB in all ({why})",
                    self.vcpus
                ));
            }
        }
        Ok(Plan {
            mmu: MmuChoice {
                mmu: match self.format {
                    Format::Shadow => SelftestMmu::Shadow,
                    tdp => SelftestMmu::Tdp(tdp.kind()),
                },
                mmio_caching: true,
                bugs: crate::inject::bug_set(self.inject.as_deref(), "selftest")?,
            },
            loops: self.loops.unwrap_or(if q { 1 } else { smr::DEFAULT_LOOPS }),
            perf: perf::Params {
                slots: self.slots.or(q.then_some(64)),
                seconds: self.seconds.unwrap_or(if q { 0.2 } else { perf::DEFAULT_SECONDS }),
                runs: self.runs,
                sizes: if q { Sizes::scaled(4) } else { Sizes::FULL },
            },
            stress: stress::Params {
                vcpus: usize::from(self.vcpus),
                bytes_per_vcpu: mib << 20,
                iterations: self.iterations,
                delay: Duration::from_micros(self.delay_us),
            },
            dirty: dlp::Params {
                vcpus: usize::from(self.vcpus),
                bytes_per_vcpu: mib << 20,
                iterations: self.dirty_iterations,
                protect: self.dirty_log.protect(),
            },
            dirty_log: self.dirty_log,
            kvm: !self.no_kvm,
        })
    }

    /// The tests named, in the C tests' order; `Err` names the unknown name.
    fn selected(&self) -> Result<Vec<Test>, String> {
        let mut want = Vec::new();
        for n in &self.names {
            if let Some(g) = Group::ALL.into_iter().find(|g| g.name() == n) {
                want.extend(Test::ALL.into_iter().filter(|&t| g.holds(t)));
            } else if let Some(t) = Test::ALL.into_iter().find(|t| t.name() == n) {
                want.push(t);
            } else {
                let names: Vec<&str> = Test::ALL.iter().map(|t| t.name()).collect();
                return Err(format!(
                    "no test named {n:?}; `vmmu selftest --list` lists them: {}",
                    names.join(", ")
                ));
            }
        }
        if want.is_empty() {
            return Err(
                "name a test or group (`vmmu selftest --list`), e.g. `vmmu selftest all`".into()
            );
        }
        Ok(Test::ALL.into_iter().filter(|t| want.contains(t)).collect())
    }
}

/// One side's cell: the figures of a pass; a test the slot cap leaves no room for is not run;
/// `/dev/kvm` not usable is skipped (not a failure); anything else failed.
fn cell<T>(r: Result<T, SelftestError>, ok: impl FnOnce(T) -> (String, String)) -> Cell {
    match r {
        Ok(t) => {
            let (short, long) = ok(t);
            Cell::Pass(short, long)
        }
        Err(SelftestError::Unavailable(why)) => {
            Cell::Skipped(format!("/dev/kvm not usable: {why}"))
        }
        Err(e) if e.is_not_run() => Cell::NotRun(e.to_string()),
        Err(e) => Cell::Fail(e.to_string()),
    }
}

fn perf_text(o: perf::Outcome) -> (String, String) {
    let perf::Outcome {
        slots,
        slot_setup: setup,
        iterations,
        per_iteration: per,
        mmio_exits: mmio,
        ..
    } = o;
    let short = match per {
        Some(d) => format!("ok, {}/it", secs(d)),
        None => "ok, 0 it".into(),
    };
    let long = format!(
        "{slots} slots, setup {}, {iterations} iterations, {} per iteration{}",
        secs(setup),
        per.map_or("n/a (no full iteration)".into(), secs),
        if mmio > 0 { format!(", {mmio} MMIO exits (allowed)") } else { String::new() }
    );
    (short, long)
}

/// A dirty-log-perf outcome's phases (either side's).
fn dirty_text(d: &dlp::Outcome) -> (String, String) {
    let mean = dlp::mean;
    let clear = if d.clear.is_empty() {
        String::new()
    } else {
        format!(", clear {}", secs(mean(&d.clear)))
    };
    (
        format!("ok, dirty {}/it", secs(mean(&d.dirty))),
        format!(
            "{} pages: populate {}, enable dirty logging {}, per iteration (mean of {}): dirty \
             memory {}, get {}{clear}; disable dirty logging {}; every GET held every page",
            d.pages,
            secs(d.populate),
            secs(d.enable),
            d.dirty.len(),
            secs(mean(&d.dirty)),
            secs(mean(&d.get)),
            secs(d.disable)
        ),
    )
}

/// David Matlack's eager-split figures (kvm-tests-and-figures.md §4(c) 3), for the mode run:
/// with "initially set" the split happens in the first CLEAR, without it when logging starts.
fn dirty_published(mode: DirtyLog) -> &'static str {
    match mode {
        DirtyLog::InitiallySet => {
            "96 vCPUs x 1 GiB HugeTLB, eager split, INITIALLY_SET: iteration-1 clear 1.668 s, \
             iteration-2 dirty memory 0.127 s"
        }
        _ => {
            "96 vCPUs x 1 GiB HugeTLB, eager split, no INITIALLY_SET: enable 1.547 s, \
             iteration-1 dirty memory 0.146 s"
        }
    }
}

fn stress_text(o: stress::Outcome) -> (String, String) {
    let stress::Outcome { updates, accesses, passes, elapsed } = o;
    (
        format!("ok, {updates} updates"),
        format!(
            "{updates} updates, {accesses} guest writes ({passes} full passes), {}",
            secs(elapsed)
        ),
    )
}

fn smr_text(o: smr::Outcome) -> (String, String) {
    (
        format!("ok, {} loops", o.loops),
        format!("{} loops, {} MMIO exits, {}", o.loops, o.mmio_exits, secs(o.elapsed)),
    )
}

/// Runs one test on both sides.
fn run_one(test: Test, p: &Plan) -> Row {
    let mut row = Row {
        test,
        sim: Cell::Skipped(String::new()),
        kvm: Cell::Skipped("--no-kvm".into()),
        sim_iter: None,
        kvm_iter: None,
        published: "pass/fail only".into(),
    };
    match test {
        Test::SetMemoryRegionMove => {
            row.sim =
                cell(vmmu_sim::selftest::set_memory_region::test_move(p.loops, &p.mmu), smr_text);
        }
        Test::SetMemoryRegionDelete => {
            row.sim =
                cell(vmmu_sim::selftest::set_memory_region::test_delete(p.loops, &p.mmu), smr_text);
        }
        Test::MemslotModificationStress => {
            row.sim = cell(vmmu_sim::selftest::stress::run(&p.stress, &p.mmu), stress_text);
        }
        Test::DirtyLogPerf => {
            row.published = dirty_published(p.dirty_log).into();
            let r = vmmu_sim::selftest::dirty_log_perf::run(&p.dirty, &p.mmu);
            if let Ok(o) = &r {
                row.sim_iter = Some(dlp::mean(&o.dirty));
            }
            row.sim = cell(r, |o| dirty_text(&o));
        }
        Test::MemslotPerf(t) => {
            let r = vmmu_sim::selftest::perf::run(t, &p.perf, &p.mmu);
            // The figure at the slots the run used, or (not run) at the cap it was given: the
            // published column says what KVM did, whether or not this side ran.
            let slots = r.as_ref().map_or(p.perf.slots.unwrap_or(32764), |o| o.slots);
            row.published = published(t, slots);
            if let Ok(o) = &r {
                row.sim_iter = o.per_iteration;
            }
            row.sim = cell(r, perf_text);
        }
    }
    if p.kvm {
        run_kvm(&mut row, p);
    }
    row
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn run_kvm(row: &mut Row, p: &Plan) {
    use vmmu_kvm::selftest::{dirty_log_perf as kdlp, perf as kp, set_memory_region as ksmr};
    row.kvm = match row.test {
        Test::SetMemoryRegionMove => cell(ksmr::test_move(p.loops), smr_text),
        Test::SetMemoryRegionDelete => cell(ksmr::test_delete(p.loops), smr_text),
        Test::MemslotModificationStress => {
            cell(vmmu_kvm::selftest::stress::run(&p.stress), stress_text)
        }
        Test::DirtyLogPerf => {
            let r = kdlp::run(&p.dirty);
            if let Ok(o) = &r {
                row.kvm_iter = Some(dlp::mean(&o.dirty));
            }
            cell(r, |o| dirty_text(&o))
        }
        Test::MemslotPerf(t) => {
            let r = kp::run(t, &p.perf);
            if let Ok(o) = &r {
                row.kvm_iter = o.per_iteration;
                if row.sim_iter.is_none() {
                    row.published = published(t, o.slots);
                }
            }
            cell(r, perf_text)
        }
    };
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn run_kvm(row: &mut Row, _p: &Plan) {
    row.kvm = Cell::Skipped("/dev/kvm not usable: needs Linux on x86-64".into());
}

/// A vmmu/KVM ratio with two decimals, or two significant digits below 0.1: a move at 2.1 us
/// against KVM's 549 us is 0.0038x, which two decimals printed as "0.00x".
fn ratio_text(r: f64) -> String {
    if !(r > 0.0 && r < 0.1) {
        return format!("{r:.2}x");
    }
    let decimals = (-r.log10()).floor() as usize + 2;
    format!("{r:.prec$}x", prec = decimals.min(12))
}

/// The side-by-side table, then each cell in full.
fn table(rows: &[Row]) -> String {
    let head = ["test", "vmmu (sim)", "KVM (/dev/kvm)", "vmmu/KVM", "published for KVM"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let ratio = match (r.sim_iter, r.kvm_iter) {
                (Some(s), Some(k)) => ratio_text(s.as_secs_f64() / k.as_secs_f64().max(1e-12)),
                _ => "-".into(),
            };
            [r.test.name().to_string(), r.sim.short(), r.kvm.short(), ratio, r.published.clone()]
        })
        .collect();
    let mut w = head.map(str::len);
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.len());
        }
    }
    let mut out = String::new();
    let mut line = |c: [&str; 5]| {
        let mut s = String::new();
        for (i, v) in c.iter().enumerate() {
            s.push_str(&format!("{v:<width$}  ", width = w[i]));
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(head);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4]]);
    }
    out.push('\n');
    for r in rows {
        let verdict = if matches!(r.sim, Cell::Fail(_)) || matches!(r.kvm, Cell::Fail(_)) {
            "FAIL"
        } else if matches!(r.sim, Cell::Pass(..)) || matches!(r.kvm, Cell::Pass(..)) {
            "PASS"
        } else {
            // Neither side ran it (the slot cap, no /dev/kvm): nothing passed.
            "NOT RUN"
        };
        out.push_str(&format!("{verdict} {}\n", r.test.name()));
        out.push_str(&format!("  vmmu (sim): {}\n", r.sim.text()));
        out.push_str(&format!("  KVM:        {}\n", r.kvm.text()));
    }
    out
}

/// The list of tests and groups.
fn list() -> String {
    let mut out = String::from("tests:\n");
    for t in Test::ALL {
        out.push_str(&format!("  {:<30} {}\n", t.name(), t.description()));
    }
    out.push_str("groups:\n");
    for g in Group::ALL {
        out.push_str(&format!("  {:<30} {}\n", g.name(), g.description()));
    }
    out
}

/// The list of tests and groups as JSON (`--list --json`): `{"tests":[{"name","description"}],
/// "groups":[...]}`.
fn list_json() -> String {
    let entry = |n: &str, d: &str| serde_json::json!({ "name": n, "description": d });
    let tests: Vec<_> = Test::ALL.iter().map(|t| entry(t.name(), t.description())).collect();
    let groups: Vec<_> = Group::ALL.iter().map(|g| entry(g.name(), g.description())).collect();
    format!("{:#}\n", serde_json::json!({ "tests": tests, "groups": groups }))
}

/// Said under a `--quick` table of perf rows: one short run per test is a sample, not a figure.
const QUICK_PERF_NOTE: &str = "--quick: one short run per perf test; on a shared host its figures \
swing several-fold from run to run (compare without --quick, or with --runs N for the best of N)\n";

/// Runs `vmmu selftest`.
pub fn run(args: &SelftestArgs) -> ExitCode {
    if args.inject.as_deref() == Some("list") {
        // As `vmmu run --inject list`.
        return if emit("selftest", &crate::inject::listing(args.json)) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    if args.list {
        let text = if args.json { list_json() } else { list() };
        return if emit("selftest", &text) { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    let tests = match args.selected() {
        Ok(t) => t,
        Err(e) => {
            note!("vmmu selftest: {e}");
            return ExitCode::from(2);
        }
    };
    let plan = match args
        .plan(tests.contains(&Test::MemslotModificationStress), tests.contains(&Test::DirtyLogPerf))
    {
        Ok(p) => p,
        Err(e) => {
            note!("vmmu selftest: {e}");
            return ExitCode::from(2);
        }
    };
    let mut rows = Vec::new();
    for t in tests {
        if !args.json {
            note!("vmmu selftest: running {}...", t.name());
        }
        rows.push(run_one(t, &plan));
    }
    let text = if args.json {
        let j: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "test": r.test.name(),
                    "sim": { "status": r.sim.status(), "detail": r.sim.text() },
                    "kvm": { "status": r.kvm.status(), "detail": r.kvm.text() },
                    "sim_ns_per_iteration": r.sim_iter.map(|d| d.as_nanos() as u64),
                    "kvm_ns_per_iteration": r.kvm_iter.map(|d| d.as_nanos() as u64),
                    "published": r.published,
                })
            })
            .collect();
        format!("{:#}\n", serde_json::json!({ "tests": j }))
    } else {
        let setup: Vec<String> = PUBLISHED_SLOTS
            .iter()
            .zip(PUBLISHED_SETUP)
            .map(|(n, s)| format!("{n}: {}", secs(Duration::from_secs_f64(s))))
            .collect();
        if rows.iter().any(|r| r.test.perf().is_some()) {
            format!(
                "{}published slot setup (adding all slots, whole test area): {}\n{}",
                table(&rows),
                setup.join(", "),
                if args.quick && args.runs == 1 { QUICK_PERF_NOTE } else { "" }
            )
        } else {
            table(&rows)
        }
    };
    let printed = emit("selftest", &text);
    let failed =
        rows.iter().any(|r| matches!(r.sim, Cell::Fail(_)) || matches!(r.kvm, Cell::Fail(_)));
    if failed || !printed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ratios_keep_two_significant_digits() {
        assert_eq!(ratio_text(18.47), "18.47x");
        assert_eq!(ratio_text(0.56), "0.56x");
        assert_eq!(ratio_text(0.1), "0.10x");
        assert_eq!(ratio_text(0.07), "0.070x");
        assert_eq!(ratio_text(2.1 / 548.8), "0.0038x");
        assert_eq!(ratio_text(0.0), "0.00x");
    }

    #[test]
    fn published_figures_at_the_nearest_slot_count() {
        assert_eq!(published_index(10), 0);
        assert_eq!(published_index(64), 2); // nearer to 50 than to 100 in log scale
        assert_eq!(published_index(32764), 5);
        assert!(published(PerfTest::Unmap, 509).contains("31.500 ms"));
        assert!(published(PerfTest::Map, 32764).contains("8194"));
        assert_eq!(published(PerfTest::Rw, 10), "none published");
    }
}
