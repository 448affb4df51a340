//! What a replay reports, per machine configuration and per trace, as text and as JSON with
//! stable keys.

use crate::oracle::OracleReport;
use serde::Serialize;
use std::fmt::Write as _;

/// A trace's verdict, and a run's.
///
/// A capture that lost events (`lost_events` in the summary, a trace converted with
/// `--allow-lost`) is incomplete: a slot request the recording made may be missing, so a
/// refusal or a misclassified MMIO access may be the trace's fault and a clean run may have
/// missed one (traces.md: a replayer must not trust its MMIO/RAM verdicts). Its checks against
/// the recording are then [`Verdict::Untrusted`]; the oracle's checks of the replay's own
/// accesses judge the MMU against the memslots it applied, and still fail a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every check passed on a complete trace.
    #[default]
    Pass,
    /// A check failed that the trace's completeness does not excuse.
    Fail,
    /// Nothing failed but the checks against an incomplete recording, which are not judged.
    Untrusted,
}

impl Verdict {
    /// The word the text report gives it.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Untrusted => "UNTRUSTED",
        }
    }

    /// The label of one run's line: `ok`, `FAIL` or `untrusted`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Untrusted => "untrusted",
        }
    }

    /// The worse of two: a failure, else an untrusted verdict, else a pass.
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Fail, _) | (_, Verdict::Fail) => Verdict::Fail,
            (Verdict::Untrusted, _) | (_, Verdict::Untrusted) => Verdict::Untrusted,
            _ => Verdict::Pass,
        }
    }

    /// The verdict of checks against the recording (`recording_ok`) and of checks that do not
    /// depend on it (`own_ok`), for a capture that lost `lost_events` events.
    fn of(own_ok: bool, recording_ok: bool, lost_events: u64) -> Verdict {
        if !own_ok {
            Verdict::Fail
        } else if lost_events > 0 {
            Verdict::Untrusted
        } else if recording_ok {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

/// How many refusals and misclassifications are kept in full (all are counted).
pub const KEEP: usize = 20;

/// A slot request the MMU refused (every recorded request succeeded on the recording host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The trace line.
    pub line: usize,
    /// `as/id`.
    pub slot: String,
    /// KVM's errno name.
    pub errno: String,
    /// The rule broken, in words.
    pub reason: String,
}

/// A recorded MMIO access the MMU did not treat as MMIO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Misclassified {
    /// The trace line.
    pub line: usize,
    /// The guest address.
    pub gpa: String,
    /// `read` or `write`.
    pub dir: String,
    /// What the MMU did instead.
    pub seen: String,
}

impl Misclassified {
    /// The `mmio` event on trace line `line`, at `gpa`, a write or a read, that reached `seen`.
    pub fn new(line: usize, gpa: u64, write: bool, seen: String) -> Self {
        let dir = if write { "write" } else { "read" };
        Misclassified { line, gpa: format!("{gpa:#x}"), dir: dir.into(), seen }
    }
}

/// Memslot requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SlotCounts {
    /// `slot` events.
    pub requests: u64,
    /// Accepted by the MMU.
    pub applied: u64,
    /// Refused by the MMU (must be 0).
    pub refused: u64,
    /// Accepted, by kind (the core's decision).
    pub creates: u64,
    /// Deletes.
    pub deletes: u64,
    /// Moves.
    pub moves: u64,
    /// Flags-only changes.
    pub flags_only: u64,
    /// Requests identical to the live slot.
    pub no_ops: u64,
    /// The first refusals.
    pub first_refusals: Vec<Refusal>,
}

/// Recorded MMIO accesses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmioCounts {
    /// `mmio` events.
    pub events: u64,
    /// Of those, `"exit":"user"` on the recording host.
    pub exit_user: u64,
    /// Of those, `"exit":"kernel"`.
    pub exit_kernel: u64,
    /// Classified as MMIO by the MMU (must equal `events`).
    pub classified_mmio: u64,
    /// Of those, writes to a read-only slot (emulated writes).
    pub readonly_writes: u64,
    /// Not classified as MMIO (must be 0).
    pub misclassified: u64,
    /// The first misclassifications.
    pub first_misclassified: Vec<Misclassified>,
    /// Reached RAM, but recorded inside the range of the slot request just before them in a
    /// trace of several vCPU threads: another vCPU's access while that request was in flight
    /// (it saw the old map), not counted as misclassified.
    pub raced_slot_request: u64,
    /// The first of those.
    pub first_raced: Vec<Misclassified>,
}

/// How the MMU handled MMIO (the core's per-vCPU counters, the replay's own accesses included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmioPaths {
    /// MMIO SPTE hits (EPT misconfig / NPT RSVD with the current generation): the fast path.
    pub mmio_spte_hit: u64,
    /// Per-vCPU MMIO info cache hits.
    pub vcpu_cache_hit: u64,
    /// Slow path (memslot lookup).
    pub slow_path: u64,
    /// Writes to read-only slots emulated.
    pub readonly_write: u64,
    /// MMIO SPTEs installed.
    pub mmio_sptes_created: u64,
    /// MMIO SPTEs found with a stale generation.
    pub stale_generation: u64,
    /// EPT violation / NPT not-present exits.
    pub violation_exits: u64,
    /// EPT misconfig / NPT RSVD exits.
    pub misconfig_exits: u64,
}

/// Zaps on delete and move, next to the recording KVM's annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Zaps {
    /// Deletes and moves applied.
    pub deletes_and_moves: u64,
    /// `kvm` `zap_all_fast` annotations in the trace.
    pub recorded_zap_all_fast: u64,
    /// Deletes and moves followed by a recorded `zap_all_fast` before the next slot request.
    pub recorded_after_delete: u64,
    /// Our `zap_all_fast` calls during deletes and moves.
    pub zap_all_fast: u64,
    /// Our range zaps during deletes and moves.
    pub zap_range: u64,
    /// Page-table pages our deletes and moves zapped (shadow pages, or TDP tables).
    pub table_pages_zapped: u64,
    /// All our `zap_all_fast` calls (generation wraps included).
    pub zap_all_fast_total: u64,
    /// Whether the per-request comparison below ran: under the shadow MMU, which zaps all on a
    /// delete or move as the recording hosts did (the TDP configurations zap the slot's range).
    pub per_request: bool,
    /// Slot requests (and the stretch before the first) whose recorded `zap_all_fast`
    /// annotations, up to the next slot request, equal our `zap_all_fast` calls during the
    /// request: a delete's or move's zap and a generation wrap's, one for one.
    pub requests_matching: u64,
    /// Those that differ.
    pub requests_differing: u64,
    /// The first few that differ.
    pub first_differing: Vec<ZapDiff>,
}

/// A slot request whose recorded `zap_all_fast` annotations differ from our calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ZapDiff {
    /// The request's trace line (0: before the first request).
    pub line: usize,
    /// Annotations recorded after it, up to the next slot request.
    pub recorded: u64,
    /// Our `zap_all_fast` calls during it.
    pub ours: u64,
}

/// Memslot update latency of the applied requests, nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Requests measured.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// Slowest.
    pub max_ns: u64,
}

impl Latency {
    /// Percentiles of `samples` (nearest rank).
    pub fn of(mut samples: Vec<u64>) -> Latency {
        samples.sort_unstable();
        let n = samples.len();
        let at = |p: usize| if n == 0 { 0 } else { samples[(n * p).div_ceil(100).clamp(1, n) - 1] };
        Latency {
            count: n as u64,
            p50_ns: at(50),
            p90_ns: at(90),
            p99_ns: at(99),
            max_ns: samples.last().copied().unwrap_or(0),
        }
    }
}

/// Dirty-log calls, applied to the core's dirty log (`Vm::get_dirty_log` /
/// `Vm::clear_dirty_log_all`, manual protect when the trace clears, as the recording VMM had it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyLog {
    /// `get-dirty-log` events.
    pub get: u64,
    /// `clear-dirty-log` events.
    pub clear: u64,
    /// Calls whose slot was live with `dirty_log` in the replay at that point (informational).
    pub on_logged_slot: u64,
    /// Whether the calls were applied to the core (true since issue 16).
    pub applied: bool,
    /// Calls the core accepted (every call, in a clean replay).
    pub accepted: u64,
    /// Calls the core refused (the recording KVM accepted every recorded call: must be 0).
    pub refused: u64,
    /// The first refusals: the trace line, the call and the errno.
    pub first_refusals: Vec<String>,
    /// Pages the GETs returned, summed.
    pub pages: u64,
    /// How the calls were applied.
    pub note: String,
}

/// The replay's own accesses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OwnAccesses {
    /// Guest reads.
    pub reads: u64,
    /// Guest writes.
    pub writes: u64,
    /// Reads through an alias of the written page.
    pub alias_reads: u64,
    /// Probes where no slot was live (must be MMIO).
    pub hole_reads: u64,
}

/// One trace on one machine configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    /// `ept-on`, `npt-off`, `shadow-on`, ...
    pub config: String,
    /// Under the shadow MMU: how the replay's guest translates its addresses (non-paging on a
    /// special root, or long mode on identity-mapped tables); absent under the TDP MMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// The host MAXPHYADDR of the machine (the TDP MMU maps guest-physical addresses below
    /// `2^phys_bits`).
    pub phys_bits: u8,
    /// Whether MMIO caching was in effect.
    pub mmio_caching_effective: bool,
    /// Why or why not.
    pub mmio_caching_reason: String,
    /// Events applied or checked (every event of the trace when the run finished).
    pub events_applied: u64,
    /// Slot requests.
    pub slots: SlotCounts,
    /// Recorded MMIO.
    pub mmio: MmioCounts,
    /// MMIO handling by path.
    pub mmio_paths: MmioPaths,
    /// Zaps.
    pub zaps: Zaps,
    /// Memslot update latency.
    pub memslot_update: Latency,
    /// Dirty-log calls.
    pub dirty_log: DirtyLog,
    /// The replay's own accesses.
    pub own_accesses: OwnAccesses,
    /// The oracle's verdict on the replay's own accesses.
    pub oracle: OracleReport,
    /// Host buffers made for the trace's `uaddr` unions.
    pub host_buffers: u64,
    /// Their total size.
    pub host_bytes: u64,
    /// Whether their pages get (4 KiB) frames on first translation: the buffers are larger
    /// than the machine's frame space (a VM of more than 1 TiB).
    pub host_frames_on_demand: bool,
    /// Samples on the trace's recorded clock and latency histograms (not part of the JSON).
    #[serde(skip)]
    pub timeline: Option<crate::timeline::Timeline>,
}

impl RunReport {
    /// No refusal, no misclassification, no violation.
    pub fn passed(&self) -> bool {
        self.recording_checks_passed() && self.oracle.violations == 0
    }

    /// What the recording says held here too: every slot request and dirty-log call accepted
    /// (the recording host accepted them all), every recorded MMIO access classified MMIO.
    pub fn recording_checks_passed(&self) -> bool {
        self.slots.refused == 0 && self.mmio.misclassified == 0 && self.dirty_log.refused == 0
    }

    /// The run's verdict for a capture that lost `lost_events` events.
    pub fn verdict(&self, lost_events: u64) -> Verdict {
        Verdict::of(self.oracle.violations == 0, self.recording_checks_passed(), lost_events)
    }
}

/// The run on real `/dev/kvm`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvmReport {
    /// Whether it ran.
    pub ran: bool,
    /// Why not, when it did not.
    pub skipped: Option<String>,
    /// What it checked and how.
    pub method: String,
    /// Slot requests KVM accepted.
    pub slots_applied: u64,
    /// Slot requests KVM refused (must be 0).
    pub slots_refused: u64,
    /// The first refusals.
    pub first_refusals: Vec<Refusal>,
    /// MMIO events checked on KVM.
    pub mmio_checked: u64,
    /// Of those, exits as MMIO.
    pub mmio_exits: u64,
    /// Of those, not MMIO on KVM (must be 0).
    pub mmio_not_mmio: u64,
    /// The first of those.
    pub first_not_mmio: Vec<Misclassified>,
    /// Of those checked, not MMIO on KVM but recorded inside the range of the slot request
    /// just before them in a trace of several vCPU threads (see
    /// [`super::inflight`]): not counted as `mmio_not_mmio`.
    pub mmio_raced: u64,
    /// Dirty-log calls KVM accepted.
    pub dirty_log_applied: u64,
    /// Dirty-log calls KVM refused (must be 0; listed with the slot refusals).
    pub dirty_log_refused: u64,
    /// Address-space-1 (SMM) slot and dirty-log requests not made because this kernel has no
    /// SMM address space (they cannot change what a guest outside SMM sees).
    pub smm_skipped: u64,
    /// A failure of the KVM machinery (not a verdict).
    pub error: Option<String>,
}

impl KvmReport {
    /// Nothing refused or misclassified, no failure (a skipped run passes).
    pub fn passed(&self) -> bool {
        self.recording_checks_passed() && self.error.is_none()
    }

    /// KVM accepted every request and exited as MMIO on every access the recording says did.
    pub fn recording_checks_passed(&self) -> bool {
        self.slots_refused == 0 && self.dirty_log_refused == 0 && self.mmio_not_mmio == 0
    }

    /// The run's verdict for a capture that lost `lost_events` events (a skipped run passes).
    pub fn verdict(&self, lost_events: u64) -> Verdict {
        if self.error.is_some() {
            Verdict::Fail
        } else if !self.ran || self.skipped.is_some() {
            Verdict::Pass
        } else {
            Verdict::of(true, self.recording_checks_passed(), lost_events)
        }
    }
}

/// The most characters of a trace's `source` the text report shows: the recordings' run to about
/// 600; a longer one keeps its start and end (the JSON keeps all of it). A 3 MB `source` made
/// the text report 3 MB.
const SOURCE_SHOWN: usize = 2000;

/// `text` with at most [`SOURCE_SHOWN`] characters: its start and its last 200, and how many were
/// left out between them.
fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    crate::report::elide(text, SOURCE_SHOWN, SOURCE_SHOWN - 200, 200)
}

/// Everything about one trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TraceReport {
    /// The file.
    pub file: String,
    /// The header's `source`.
    pub source: String,
    /// Events by kind.
    pub events: std::collections::BTreeMap<String, u64>,
    /// The trace ends with a summary line (optional in v1). Each of the three counts below is
    /// `None` (`null` in JSON) when the summary does not give it, or there is none: unknown.
    pub has_summary: bool,
    /// From the summary: kernel MMIO events left out of a reduced trace.
    pub kernel_mmio_dropped: Option<u64>,
    /// From the summary: events the capture lost. Not given, the verdicts are those of a
    /// complete capture (a warning says so).
    pub lost_events: Option<u64>,
    /// From the summary: vCPU threads (replay is exact for 1).
    pub vcpu_threads: Option<u64>,
    /// Warnings about the trace itself.
    pub warnings: Vec<String>,
    /// One run per machine configuration.
    pub runs: Vec<RunReport>,
    /// Machine configurations that could not run the trace at all, one line each
    /// (`sim-CONFIG: cannot replay: WHY`); any makes the trace fail.
    pub run_errors: Vec<String>,
    /// The run on `/dev/kvm`.
    pub kvm: KvmReport,
    /// The trace's verdict: the worst of its runs' (a run error fails it).
    pub verdict: Verdict,
    /// The verdict is a pass.
    pub passed: bool,
}

fn us(ns: u64) -> String {
    format!("{:.1} us", ns as f64 / 1000.0)
}

impl TraceReport {
    /// A count from the summary line, `not given` when the summary leaves it out, or
    /// `unknown (no summary line)`.
    pub fn summary_count(&self, n: Option<u64>) -> String {
        match n {
            Some(n) => n.to_string(),
            None if self.has_summary => "not given".to_string(),
            None => "unknown (no summary line)".to_string(),
        }
    }

    /// The events the capture lost, for the verdicts: a count not given counts as none.
    pub fn lost(&self) -> u64 {
        self.lost_events.unwrap_or(0)
    }

    /// Sets [`Self::verdict`] and [`Self::passed`] from the runs, the run errors and the KVM
    /// half, for a capture that lost [`Self::lost_events`] events.
    pub fn judge(&mut self) {
        let lost = self.lost();
        let mut v = if self.run_errors.is_empty() { Verdict::Pass } else { Verdict::Fail };
        for r in &self.runs {
            v = v.and(r.verdict(lost));
        }
        self.verdict = v.and(self.kvm.verdict(lost));
        self.passed = self.verdict == Verdict::Pass;
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "{} {}", self.verdict.word(), self.file);
        // Free text from the trace file: control characters (a terminal's escape sequences)
        // are shown escaped, not sent to the terminal.
        let source: String = self
            .source
            .chars()
            .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
            .collect();
        let _ = writeln!(s, "  source: {}", shortened(&source));
        let ev: Vec<String> = self.events.iter().map(|(k, v)| format!("{k} {v}")).collect();
        if self.has_summary {
            let _ = writeln!(
                s,
                "  events: {} (kernel MMIO dropped {}, lost {}, vCPU threads {})",
                ev.join(", "),
                self.summary_count(self.kernel_mmio_dropped),
                self.summary_count(self.lost_events),
                self.summary_count(self.vcpu_threads)
            );
        } else {
            let _ = writeln!(s, "  events: {} (no summary line)", ev.join(", "));
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        for e in &self.run_errors {
            let _ = writeln!(s, "  [FAIL] {e}");
        }
        for r in &self.runs {
            let v = r.verdict(self.lost()).label();
            let _ = writeln!(
                s,
                "  sim-{} [{v}] (MMIO caching {}: {}; MAXPHYADDR {}): {} events applied",
                r.config,
                if r.mmio_caching_effective { "on" } else { "off" },
                r.mmio_caching_reason,
                r.phys_bits,
                r.events_applied
            );
            if let Some(g) = &r.guest {
                let _ = writeln!(s, "    guest: {g}");
            }
            if r.host_frames_on_demand {
                let _ = writeln!(
                    s,
                    "    host: {} GiB in {} buffers, past the machine's frame space: 4 KiB frames on first translation",
                    r.host_bytes >> 30,
                    r.host_buffers
                );
            }
            let sl = &r.slots;
            let _ = writeln!(
                s,
                "    slots: {} applied, {} refused (create {}, delete {}, move {}, flags {}, no-op {})",
                sl.applied, sl.refused, sl.creates, sl.deletes, sl.moves, sl.flags_only, sl.no_ops
            );
            for f in &sl.first_refusals {
                let _ = writeln!(
                    s,
                    "      refused line {}: slot {} {}: {}",
                    f.line, f.slot, f.errno, f.reason
                );
            }
            let m = &r.mmio;
            let _ = writeln!(
                s,
                "    mmio: {} events ({} user, {} kernel), {} classified MMIO ({} read-only-slot writes), {} misclassified",
                m.events, m.exit_user, m.exit_kernel, m.classified_mmio, m.readonly_writes, m.misclassified
            );
            for f in &m.first_misclassified {
                let _ = writeln!(s, "      line {}: {} {}: {}", f.line, f.dir, f.gpa, f.seen);
            }
            if m.raced_slot_request > 0 {
                let _ = writeln!(
                    s,
                    "    mmio: {} more reached RAM inside the range of the slot request just before them: another vCPU's accesses while that request was in flight (the recording stamps a request when it starts), not misclassified",
                    m.raced_slot_request
                );
                for f in &m.first_raced {
                    let _ = writeln!(s, "      line {}: {} {}: {}", f.line, f.dir, f.gpa, f.seen);
                }
            }
            let p = &r.mmio_paths;
            let _ = writeln!(
                s,
                "    mmio paths (recorded and own accesses): MMIO SPTE hit {}, vCPU cache hit {}, slow path {}, read-only write {} (MMIO SPTEs created {}, stale generation {}; exits: violation {}, misconfig/RSVD {})",
                p.mmio_spte_hit, p.vcpu_cache_hit, p.slow_path, p.readonly_write, p.mmio_sptes_created, p.stale_generation, p.violation_exits, p.misconfig_exits
            );
            let z = &r.zaps;
            let _ = writeln!(
                s,
                "    zaps: {} deletes+moves; recorded KVM zap_all_fast {} ({} right after a delete); ours during deletes+moves: zap_all_fast {}, range zaps {}, table pages zapped {}",
                z.deletes_and_moves, z.recorded_zap_all_fast, z.recorded_after_delete, z.zap_all_fast, z.zap_range, z.table_pages_zapped
            );
            if z.per_request {
                let _ = writeln!(
                    s,
                    "      per slot request (and the stretch before the first): {} match the recording, {} differ",
                    z.requests_matching, z.requests_differing
                );
                for d in &z.first_differing {
                    let _ = writeln!(
                        s,
                        "        line {}: recorded zap_all_fast {}, ours {}",
                        d.line, d.recorded, d.ours
                    );
                }
            }
            let l = &r.memslot_update;
            let _ = writeln!(
                s,
                "    memslot update latency: p50 {}, p90 {}, p99 {}, max {} ({} updates)",
                us(l.p50_ns),
                us(l.p90_ns),
                us(l.p99_ns),
                us(l.max_ns),
                l.count
            );
            let d = &r.dirty_log;
            let _ = writeln!(
                s,
                "    dirty log: {} get, {} clear, {} accepted, {} refused, {} on a slot live with dirty_log, {} pages returned ({})",
                d.get, d.clear, d.accepted, d.refused, d.on_logged_slot, d.pages, d.note
            );
            for f in &d.first_refusals {
                let _ = writeln!(s, "      refused {f}");
            }
            let o = &r.own_accesses;
            let _ = writeln!(
                s,
                "    own accesses: {} reads, {} writes, {} alias reads, {} hole reads; oracle: {} checked, {} violations",
                o.reads, o.writes, o.alias_reads, o.hole_reads, r.oracle.checked, r.oracle.violations
            );
            for v in &r.oracle.first_violations {
                let _ = writeln!(s, "      {v}");
            }
        }
        let k = &self.kvm;
        if let Some(why) = &k.skipped {
            let _ = writeln!(s, "  kvm: skipped: {why}");
        } else if let Some(e) = &k.error {
            let _ = writeln!(s, "  kvm [FAIL]: {e}");
        } else if k.ran {
            let v = k.verdict(self.lost()).label();
            let _ = writeln!(
                s,
                "  kvm [{v}]: slots {} applied, {} refused; dirty-log calls {} applied, {} refused; mmio {} checked, {} exited as MMIO, {} not MMIO ({})",
                k.slots_applied, k.slots_refused, k.dirty_log_applied, k.dirty_log_refused, k.mmio_checked, k.mmio_exits, k.mmio_not_mmio, k.method
            );
            for f in &k.first_refusals {
                let _ = writeln!(
                    s,
                    "      refused line {}: {} slot {}: {}",
                    f.line, f.reason, f.slot, f.errno
                );
            }
            for f in &k.first_not_mmio {
                let _ = writeln!(s, "      line {}: {} {}: {}", f.line, f.dir, f.gpa, f.seen);
            }
            if k.mmio_raced > 0 {
                let _ = writeln!(
                    s,
                    "    kvm: {} more reached memory inside the range of the slot request just before them (another vCPU's accesses while it was in flight), not counted as not MMIO",
                    k.mmio_raced
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_the_line_of_every_kept_refusal() {
        let mut run = RunReport::default();
        run.slots.refused = 1;
        run.slots.first_refusals.push(Refusal {
            line: 3,
            slot: "0/1".into(),
            errno: "EEXIST".into(),
            reason: "overlap".into(),
        });
        run.dirty_log.refused = 1;
        run.dirty_log.first_refusals.push("line 5: clear-dirty-log as 0 id 0: EINVAL".into());
        let report = TraceReport { runs: vec![run], ..TraceReport::default() };
        let text = report.text();
        assert!(text.contains("refused line 3: slot 0/1 EEXIST: overlap"), "{text}");
        assert!(text.contains("refused line 5: clear-dirty-log as 0 id 0: EINVAL"), "{text}");
    }

    /// The run's line of the text report: `sim-ept-on [ok]` or `sim-ept-on [FAIL]`.
    fn run_line(run: RunReport) -> String {
        let report = TraceReport { runs: vec![run], ..TraceReport::default() };
        let text = report.text();
        text.lines().find(|l| l.starts_with("  sim-")).expect("a run line").to_string()
    }

    /// A very long `source` is shortened in the text (start, end, and how much was left out);
    /// the recordings' (up to about 600 characters) are shown whole.
    #[test]
    fn a_very_long_source_is_shortened_in_the_text() {
        let whole = "q".repeat(SOURCE_SHOWN);
        assert_eq!(shortened(&whole), whole);
        let long = format!("start{}end", "x".repeat(3_000_000));
        let t = TraceReport { source: long.clone(), ..TraceReport::default() }.text();
        let line = t.lines().find(|l| l.starts_with("  source: ")).expect("source line");
        assert!(line.len() < 2100, "{}", line.len());
        assert!(line.starts_with("  source: startxxx") && line.ends_with("xxxend"), "{line}");
        let left_out = long.len() - SOURCE_SHOWN;
        assert!(line.contains(&format!("[... {left_out} characters left out ...]")), "{line}");
    }

    /// The MMIO path counts come from the core's vCPU counters, so they include the replay's
    /// own probes (a read-only slot's own writes): the line says so, or "read-only write 226"
    /// beside "0 read-only-slot writes" on the `mmio:` line reads as a contradiction.
    #[test]
    fn the_mmio_paths_line_says_it_counts_the_own_accesses_too() {
        let mut run = RunReport { config: "ept-on".into(), ..RunReport::default() };
        run.mmio_paths.readonly_write = 226;
        let text = TraceReport { runs: vec![run], ..TraceReport::default() }.text();
        let line = text.lines().find(|l| l.contains("mmio paths")).expect("mmio paths line");
        assert!(
            line.contains("(recorded and own accesses)") && line.contains("read-only write 226")
        );
    }

    #[test]
    fn any_refusal_misclassification_or_violation_alone_fails_the_run() {
        let run = || RunReport { config: "ept-on".into(), ..RunReport::default() };
        assert!(run_line(run()).starts_with("  sim-ept-on [ok]"), "{}", run_line(run()));
        let mut refused = run();
        refused.slots.refused = 1;
        let mut misclassified = run();
        misclassified.mmio.misclassified = 1;
        let mut violation = run();
        violation.oracle.violations = 1;
        let mut dirty = run();
        dirty.dirty_log.refused = 1;
        for (what, r) in [
            ("a refused slot request", refused),
            ("a misclassified MMIO access", misclassified),
            ("an oracle violation", violation),
            ("a refused dirty-log call", dirty),
        ] {
            assert!(!r.passed(), "{what} passed");
            let line = run_line(r);
            assert!(line.starts_with("  sim-ept-on [FAIL]"), "{what}: {line}");
        }
    }

    /// The KVM line of the text report of a run on KVM.
    fn kvm_line(kvm: KvmReport) -> String {
        let report = TraceReport { kvm, ..TraceReport::default() };
        let text = report.text();
        text.lines().find(|l| l.starts_with("  kvm")).expect("a kvm line").to_string()
    }

    #[test]
    fn any_refusal_or_non_mmio_exit_alone_fails_the_kvm_run_and_a_skipped_run_passes() {
        let ran = || KvmReport { ran: true, method: "m".into(), ..KvmReport::default() };
        assert!(kvm_line(ran()).starts_with("  kvm [ok]"), "{}", kvm_line(ran()));
        let mut slot = ran();
        slot.slots_refused = 1;
        let mut dirty = ran();
        dirty.dirty_log_refused = 1;
        let mut not_mmio = ran();
        not_mmio.mmio_not_mmio = 1;
        for (what, k) in [
            ("a refused slot request", slot),
            ("a refused dirty-log call", dirty),
            ("an access that was not MMIO", not_mmio),
        ] {
            assert!(!k.passed(), "{what} passed");
            let line = kvm_line(k);
            assert!(line.starts_with("  kvm [FAIL]"), "{what}: {line}");
        }
        let failed = KvmReport { error: Some("KVM_RUN: EFAULT".into()), ..ran() };
        assert!(!failed.passed());
        assert_eq!(kvm_line(failed), "  kvm [FAIL]: KVM_RUN: EFAULT");
        let skipped = KvmReport { skipped: Some("no /dev/kvm".into()), ..KvmReport::default() };
        assert!(skipped.passed());
        assert_eq!(kvm_line(skipped), "  kvm: skipped: no /dev/kvm");
    }

    #[test]
    fn the_first_line_gives_the_trace_verdict_and_a_run_error_is_a_fail_line() {
        let mut failed = TraceReport {
            file: "t.jsonl".into(),
            run_errors: vec!["sim-npt-off: cannot replay: no memory".into()],
            ..TraceReport::default()
        };
        failed.judge();
        assert!(!failed.passed);
        let text = failed.text();
        assert!(text.starts_with("FAIL t.jsonl\n"), "{text}");
        assert!(text.contains("\n  [FAIL] sim-npt-off: cannot replay: no memory\n"), "{text}");
        let mut passed = TraceReport { file: "t.jsonl".into(), ..TraceReport::default() };
        passed.judge();
        assert!(passed.passed);
        assert!(passed.text().starts_with("PASS t.jsonl\n"), "{}", passed.text());
    }

    /// A trace whose capture lost events: what it disagrees with is not judged (neither a pass
    /// nor a fail), what the oracle finds in the replay's own accesses still fails it.
    #[test]
    fn a_capture_that_lost_events_is_untrusted_but_an_oracle_violation_still_fails() {
        let trace = |run: RunReport, kvm: KvmReport| {
            let mut t = TraceReport {
                file: "t.jsonl".into(),
                lost_events: Some(3),
                runs: vec![run],
                kvm,
                ..TraceReport::default()
            };
            t.judge();
            t
        };
        let run = || RunReport { config: "ept-on".into(), ..RunReport::default() };
        let kvm = || KvmReport { ran: true, method: "m".into(), ..KvmReport::default() };
        let clean = trace(run(), kvm());
        assert_eq!(clean.verdict, Verdict::Untrusted);
        assert!(!clean.passed);
        let text = clean.text();
        assert!(text.starts_with("UNTRUSTED t.jsonl\n"), "{text}");
        assert!(text.contains("\n  sim-ept-on [untrusted]"), "{text}");
        assert!(text.contains("\n  kvm [untrusted]"), "{text}");
        let mut misclassified = run();
        misclassified.mmio.misclassified = 2;
        let mut refused = kvm();
        refused.slots_refused = 1;
        assert_eq!(trace(misclassified, refused).verdict, Verdict::Untrusted);
        let mut violation = run();
        violation.oracle.violations = 1;
        let failed = trace(violation, kvm());
        assert_eq!(failed.verdict, Verdict::Fail);
        assert!(failed.text().contains("\n  sim-ept-on [FAIL]"), "{}", failed.text());
        let broken = KvmReport { error: Some("KVM_RUN: EFAULT".into()), ..kvm() };
        assert_eq!(trace(run(), broken).verdict, Verdict::Fail);
        let skipped = KvmReport { skipped: Some("--no-kvm".into()), ..KvmReport::default() };
        assert_eq!(trace(run(), skipped).verdict, Verdict::Untrusted);
        // The same disagreements on a complete capture fail.
        let mut complete = trace(run(), kvm());
        complete.lost_events = Some(0);
        complete.runs[0].mmio.misclassified = 1;
        complete.judge();
        assert_eq!(complete.verdict, Verdict::Fail);
    }

    #[test]
    fn latencies_are_shown_in_microseconds() {
        let run = RunReport {
            memslot_update: Latency::of(vec![1500, 2000, 250_000]),
            ..RunReport::default()
        };
        let text = TraceReport { runs: vec![run], ..TraceReport::default() }.text();
        assert!(
            text.contains(
                "memslot update latency: p50 2.0 us, p90 250.0 us, p99 250.0 us, max 250.0 us (3 updates)"
            ),
            "{text}"
        );
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let l = Latency::of((1..=100).collect());
        assert_eq!((l.p50_ns, l.p90_ns, l.p99_ns, l.max_ns, l.count), (50, 90, 99, 100, 100));
        assert_eq!(Latency::of(vec![]).max_ns, 0);
        assert_eq!(Latency::of(vec![7]).p50_ns, 7);
    }
}
