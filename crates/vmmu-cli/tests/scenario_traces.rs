//! Random scenarios turned into traces: a scenario's run on the software machine gives KVM's
//! answers (the differential test holds the two streams equal), so its accepted slot requests,
//! its MMIO exits and its accepted dirty-log calls make a valid vmmu trace (`traces.md`): the
//! memslot map of a VMM nobody recorded, with moves, flags-only changes, aliases of one buffer,
//! slots past their buffer's end, a second address space and dirty logging in either mode. Every
//! such trace must replay cleanly under every machine configuration (nothing refused, every MMIO
//! event classified as MMIO, no oracle violation), and on `/dev/kvm` where it is usable: the
//! replayer's reading of slots (`uaddr` unions, deletes, moves) and its classification must
//! agree with the scenario runner's, on inputs from outside the committed recordings.
//!
//! `VMMU_DIFF_CASES` sets the number of scenarios per generator (default 100); the `/dev/kvm`
//! replays take the first quarter of them.
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use vmmu_scenario::diff::{run_source, Outcome};
use vmmu_scenario::generate::{paging_scenario, scenario, wide_scenario, GenScenario};
use vmmu_scenario::{
    parse, DirtyLogResult, Observation, Op, ReadExit, Scenario, SlotResult, WriteExit,
};
use vmmu_sim::replay::{self, ReplayConfig};

/// Where the trace's VMM keeps buffer `i`: 256 GiB apart, far more than any generated slot
/// reaches past its buffer, so distinct buffers never alias.
fn uaddr_base(i: usize) -> u64 {
    0x1000_0000_0000 + (i as u64) * 0x40_0000_0000
}

/// The trace of `s`'s run whose observations are `obs`, and how many `mmio` events it holds.
fn trace_of(s: &Scenario, obs: &[Observation]) -> (String, usize) {
    let by_step: BTreeMap<u32, &Observation> =
        obs.iter().filter_map(|o| Some((o.step()?, o))).collect();
    let mut t = String::from("{\"vmmu_trace\":1,\"source\":\"generated from a scenario\"}\n");
    let mut us = 0u64;
    let mut mmio = 0;
    let mut stamp = |t: &mut String| {
        let _ = write!(t, "{{\"t\":{}.{:06},", us / 1_000_000, us % 1_000_000);
        us += 1;
    };
    for step in &s.steps {
        let o = by_step.get(&step.number).copied();
        match (&step.op, o) {
            (Op::Slot(op), Some(Observation::Slot { result: SlotResult::Ok, .. })) => {
                let mut flags = Vec::new();
                if op.flags.dirty_log {
                    flags.push("\"dirty_log\"");
                }
                if op.flags.readonly {
                    flags.push("\"readonly\"");
                }
                let uaddr = op.mem.as_ref().map_or(0, |m| uaddr_base(m.mem.0) + m.offset);
                stamp(&mut t);
                let _ = writeln!(
                    t,
                    "\"op\":\"slot\",\"as\":{},\"id\":{},\"flags\":[{}],\"gpa\":\"{:#x}\",\
                     \"size\":\"{:#x}\",\"uaddr\":\"{uaddr:#x}\"}}",
                    op.as_id,
                    op.id,
                    flags.join(","),
                    op.gpa,
                    op.size
                );
            }
            (
                Op::Read(_),
                Some(Observation::Read { exit: ReadExit::Mmio { gpa, len, value }, .. }),
            ) => {
                stamp(&mut t);
                mmio_line(&mut t, "read", *gpa, *len, *value);
                mmio += 1;
            }
            (
                Op::Write(_),
                Some(Observation::Write { exit: WriteExit::Mmio { gpa, len, data }, .. }),
            ) => {
                stamp(&mut t);
                mmio_line(&mut t, "write", *gpa, *len, *data);
                mmio += 1;
            }
            (
                Op::DirtyLog(op),
                Some(Observation::DirtyLog { result: DirtyLogResult::Ok(_), .. }),
            ) => {
                stamp(&mut t);
                let _ =
                    writeln!(t, "\"op\":\"get-dirty-log\",\"as\":{},\"id\":{}}}", op.as_id, op.id);
            }
            (
                Op::ClearDirtyLog(op),
                Some(Observation::ClearDirtyLog { result: SlotResult::Ok, .. }),
            ) => {
                stamp(&mut t);
                let _ = writeln!(
                    t,
                    "\"op\":\"clear-dirty-log\",\"as\":{},\"id\":{},\"first_page\":{},\
                     \"num_pages\":{}}}",
                    op.as_id, op.id, op.first, op.count
                );
            }
            _ => {}
        }
    }
    (t, mmio)
}

/// The rest of an `mmio` event line (after `t`): an access that exited to the VMM.
fn mmio_line(t: &mut String, dir: &str, gpa: u64, len: u32, value: u64) {
    let _ = writeln!(
        t,
        "\"op\":\"mmio\",\"dir\":\"{dir}\",\"gpa\":\"{gpa:#x}\",\"len\":{len},\
         \"value\":\"{value:#x}\",\"exit\":\"user\"}}"
    );
}

fn cases() -> u32 {
    match std::env::var("VMMU_DIFF_CASES") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("VMMU_DIFF_CASES={v} is not a number")),
        Err(_) => 100,
    }
}

/// Runs the generated scenario on the machine and returns its trace, or `None` when the
/// machine skipped or refused the scenario.
fn trace_from(g: &GenScenario) -> Result<Option<(String, usize)>, TestCaseError> {
    let text = g.text();
    let s = parse(&text).map_err(|e| TestCaseError::fail(format!("does not parse: {e}")))?;
    match run_source("sim", &vmmu_sim::SimBackend, &s).outcome {
        Outcome::Stream(obs) => {
            if matches!(obs.first(), Some(Observation::Skipped { .. })) {
                return Ok(None);
            }
            Ok(Some(trace_of(&s, &obs)))
        }
        Outcome::Failed(why) => Err(TestCaseError::fail(format!("the machine failed: {why}"))),
        Outcome::Unavailable(_) => Ok(None),
    }
}

/// Replays `trace` under every machine configuration; a refusal, misclassification or oracle
/// violation fails the case.
fn replay_everywhere(trace: &str, mmio: usize) -> Result<(), TestCaseError> {
    let parsed = replay::parse(trace)
        .map_err(|e| TestCaseError::fail(format!("the trace does not parse: {e}\n{trace}")))?;
    for cfg in ReplayConfig::every(replay::phys_bits_for(&parsed)) {
        check_run(&parsed, &cfg, mmio, trace)?;
    }
    Ok(())
}

fn check_run(
    parsed: &replay::Trace,
    cfg: &ReplayConfig,
    mmio: usize,
    trace: &str,
) -> Result<(), TestCaseError> {
    let name = cfg.name();
    let r = replay::replay(parsed, cfg)
        .map_err(|e| TestCaseError::fail(format!("{name}: the replay stopped: {e}\n{trace}")))?;
    if !r.passed() || r.mmio.classified_mmio != mmio as u64 {
        return Err(TestCaseError::fail(format!(
            "{name}: slots {:?}, misclassified {:?}, MMIO {} of {mmio}, oracle {:?}\n{trace}",
            r.slots, r.mmio.misclassified, r.mmio.classified_mmio, r.oracle
        )));
    }
    Ok(())
}

/// Runs `strategy`'s scenarios as traces; the first quarter of them also through `vmmu replay`
/// with `/dev/kvm` (where usable).
fn traces_replay(strategy: proptest::strategy::BoxedStrategy<GenScenario>) {
    let on_kvm = cases().div_ceil(4);
    let kvm = match vmmu_kvm::probe() {
        Ok(_) => true,
        Err(why) => {
            println!("skipped on /dev/kvm: {why}");
            false
        }
    };
    let mut runner =
        TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let kvm_runs = Cell::new(0u32);
    let events = Cell::new((0usize, 0usize));
    let result = runner.run(&strategy, |g| {
        let Some((trace, mmio)) = trace_from(&g)? else { return Ok(()) };
        let (n, m) = events.get();
        events.set((n + trace.lines().count() - 1, m + mmio));
        replay_everywhere(&trace, mmio)?;
        if kvm && kvm_runs.get() < on_kvm {
            kvm_runs.set(kvm_runs.get() + 1);
            kvm_replay(&trace)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (n, m) = events.get();
    println!(
        "{} cases: {n} events, {m} of them MMIO; {} replayed on /dev/kvm",
        cases(),
        kvm_runs.get()
    );
    assert!(m > 0, "the generated traces hold no MMIO event");
}

/// `vmmu replay --json --format ept --mmio-caching on -` with the trace on standard input (the
/// tests run in parallel, and share no file): the KVM side must run, accept every request and
/// see every MMIO event as MMIO.
fn kvm_replay(trace: &str) -> Result<(), TestCaseError> {
    use std::io::Write as _;
    let fail = |e: std::io::Error| TestCaseError::fail(format!("vmmu replay: {e}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmmu"))
        .args(["replay", "--json", "--format", "ept", "--mmio-caching", "on", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(fail)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(trace.as_bytes()).map_err(fail)?;
    drop(stdin);
    let out = child.wait_with_output().map_err(fail)?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    })?;
    // Exit 0 says every run passed, KVM's included (nothing refused, every MMIO event MMIO,
    // no failure); a skipped KVM run passes too, so `ran` must be said.
    let k = &doc["traces"][0]["kvm"];
    if out.status.code() != Some(0) || k["ran"] != true {
        return Err(TestCaseError::fail(format!(
            "/dev/kvm: exit {:?}, {k:#}, stderr: {}\n{trace}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

#[test]
fn generated_scenarios_replay_as_traces() {
    traces_replay(proptest::strategy::Strategy::boxed(scenario()));
}

#[test]
fn generated_wide_scenarios_replay_as_traces() {
    traces_replay(wide_scenario());
}

#[test]
fn generated_paging_scenarios_replay_as_traces() {
    traces_replay(paging_scenario());
}
