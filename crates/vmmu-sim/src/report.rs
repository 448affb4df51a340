//! The run report as data: what `vmmu run` prints (the CLI renders it as text, or as JSON through
//! its `Serialize` form: snake_case keys, nested groups `config`, `vcpus`, `exits`, `mmu`,
//! `memslots`, `tlb`, `tables`, `oracle`, and `dirty_log` when the run logged dirty pages).
//!
//! The machine fills everything it measures itself; the MMU's part comes from
//! [`GuestMmu::stats`](crate::seam::GuestMmu::stats) and
//! [`GuestMmu::mmio_caching`](crate::seam::GuestMmu::mmio_caching). Keys are part of the CLI's
//! interface: add keys, never rename them.

use crate::host::{ReaderFenceKind, TableStats};
use crate::oracle::OracleReport;
use crate::seam::{MmuCounters, MmuExits, MmuStats};
use crate::timeline::Timeline;
use crate::tlb::TlbStats;
use hdrhistogram::Histogram;
use serde::{Serialize, Serializer};
use vmmu::spte::FormatKind;
use vmmu::vm::MmuKind;

/// `text` as a report shows it: whole up to `max` characters, else its first `head` and last
/// `tail` characters with how many were left out between them (an input may quote a word or a
/// `source` of megabytes). The CLI's messages and the replay's text report both shorten this way.
pub fn elide(text: &str, max: usize, head: usize, tail: usize) -> std::borrow::Cow<'_, str> {
    let n = text.chars().count();
    if n <= max {
        return text.into();
    }
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(n - tail).collect();
    format!("{start}[... {} characters left out ...]{end}", n - head - tail).into()
}

/// The complete report of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// What ran.
    pub config: ConfigReport,
    /// Wall-clock seconds the vCPUs ran.
    pub elapsed_seconds: f64,
    /// Per vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// Exits by kind.
    pub exits: ExitsReport,
    /// MMU counters.
    pub mmu: MmuReport,
    /// Memslot updates.
    pub memslots: MemslotReport,
    /// TLB totals over all vCPUs.
    pub tlb: TlbStats,
    /// Page-table pages.
    pub tables: TableStats,
    /// The oracle's verdict.
    pub oracle: OracleReport,
    /// Per-interval samples and latency histograms, when the run recorded them
    /// (`MachineConfig::timeline`; not part of the JSON report).
    #[serde(skip)]
    pub timeline: Option<Timeline>,
    /// The dirty-log oracle's numbers (`--dirty-log` runs only; absent from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_log: Option<crate::migration::DirtyLogReport>,
    /// What the guests did with their page tables, summed over the vCPUs (guest paging only:
    /// `--format shadow` or `--guest-paging`; absent from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_paging: Option<crate::machine_paging::PagingCounters>,
}

/// The name the CLI and the report use for a format: `ept`, `npt` (`npt-sev` with a C-bit).
pub const fn format_name(f: FormatKind) -> &'static str {
    match f {
        FormatKind::Ept => "ept",
        FormatKind::Npt => "npt",
        FormatKind::NptSev { .. } => "npt-sev",
    }
}

/// The name the CLI and the report use for an MMU: `tdp` or `shadow` (`--format shadow`).
pub const fn mmu_name(m: MmuKind) -> &'static str {
    match m {
        MmuKind::Tdp => "tdp",
        MmuKind::Shadow => "shadow",
    }
}

fn serialize_mmu<S: Serializer>(m: &MmuKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(mmu_name(*m))
}

fn serialize_format<S: Serializer>(f: &FormatKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(format_name(*f))
}

/// The real MMU's counters, or `{}` for an MMU without them (the key set of `mmu.extra` is the
/// MMU's business; its keys never change meaning).
fn serialize_counters<S: Serializer>(c: &Option<MmuCounters>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    match c {
        Some(c) => c.serialize(s),
        None => s.serialize_map(Some(0))?.end(),
    }
}

/// The configuration a run used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigReport {
    /// The MMU (JSON and text: `tdp` or `shadow`).
    #[serde(serialize_with = "serialize_mmu")]
    pub mmu: MmuKind,
    /// Whether vCPUs access memory through their own guest page tables (always under a shadow
    /// MMU).
    pub guest_paging: bool,
    /// SPTE format (JSON and text: `ept`, `npt` or `npt-sev`; a shadow MMU's SPTEs are x86
    /// page-table entries, `npt`).
    #[serde(serialize_with = "serialize_format")]
    pub format: FormatKind,
    /// Host MAXPHYADDR.
    pub phys_bits: u8,
    /// vCPUs.
    pub vcpus: usize,
    /// The seed of the access mix.
    pub seed: u64,
    /// MMIO caching: asked for, in effect, why.
    pub mmio_caching: MmioCachingReport,
    /// The SRCU reader fences in effect (JSON and text: `full` or `membarrier`).
    pub reader_fences: ReaderFenceKind,
    /// A shadow MMU's page limit at the end of the run (JSON `null` under TDP).
    pub shadow_pages: Option<ShadowPagesReport>,
}

/// A shadow MMU's page limit (KVM `n_max_mmu_pages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ShadowPagesReport {
    /// The limit.
    pub limit: usize,
    /// Set by the VMM (`KVM_SET_NR_MMU_PAGES`, `--shadow-pages N`); `false`: KVM's default, 2%
    /// of the memslots' pages (64 at least), recomputed as they change.
    pub set: bool,
}

impl Default for ConfigReport {
    fn default() -> Self {
        ConfigReport {
            mmu: MmuKind::Tdp,
            guest_paging: false,
            format: FormatKind::Ept,
            phys_bits: 0,
            vcpus: 0,
            seed: 0,
            mmio_caching: MmioCachingReport::default(),
            reader_fences: ReaderFenceKind::Full,
            shadow_pages: None,
        }
    }
}

/// MMIO caching as requested and as in effect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmioCachingReport {
    /// Whether `--mmio-caching on` was asked for.
    pub requested: bool,
    /// Whether the MMU uses MMIO SPTEs.
    pub effective: bool,
    /// Why (from the MMU).
    pub reason: String,
}

/// One vCPU's work.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: usize,
    /// Accesses done.
    pub accesses: u64,
    /// Accesses per second of the run.
    pub accesses_per_sec: f64,
    /// Loads.
    pub reads: u64,
    /// Stores.
    pub writes: u64,
    /// Accesses that went to RAM.
    pub ram: u64,
    /// Accesses a device handled.
    pub mmio_device: u64,
    /// Accesses that exited to userspace.
    pub mmio_userspace: u64,
    /// ROM writes that exited (read-only slot).
    pub readonly_write: u64,
    /// Faults the MMU asked this vCPU to retry (`RET_PF_RETRY`), under every MMU; a fixed fault,
    /// after which the vCPU walks again too, is not one.
    pub retries: u64,
    /// Times the vCPU left guest mode and yielded its CPU to a thread waiting for vCPUs
    /// ([`crate::handoff`]).
    pub gave_way: u64,
    /// Accesses the MMU failed.
    pub errors: u64,
    /// This vCPU's TLB.
    pub tlb: TlbStats,
}

/// Exits by kind: the MMU's fault-path view plus the machine's MMIO destinations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitsReport {
    /// The MMU's exits by kind (its keys sit beside the machine's in the JSON).
    #[serde(flatten)]
    pub mmu: MmuExits,
    /// Writes to the read-only ROM slot that exited (machine).
    pub readonly_write: u64,
    /// MMIO handled by an in-process device (machine).
    pub mmio_device: u64,
    /// MMIO exits to userspace (machine).
    pub mmio_userspace: u64,
}

/// The MMU's counters other than exits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MmuReport {
    /// MMIO SPTEs installed.
    pub mmio_sptes_created: u64,
    /// TDP range zaps (a memslot delete or move, a host invalidation): calls, not SPTEs; the
    /// shadow MMU zaps through its reverse map and counts in `mmu_shadow_zapped` instead.
    pub zaps: u64,
    /// `zap_all_fast` calls.
    pub zap_all_fast: u64,
    /// Faults that returned "retry" (MMU side; the vCPUs' own count is per vCPU).
    pub retries: u64,
    /// Remote TLB flush requests.
    pub tlb_flush_requests: u64,
    /// The real MMU's own counters (JSON `extra`, `{}` for an MMU without them).
    #[serde(serialize_with = "serialize_counters")]
    pub extra: Option<MmuCounters>,
}

/// Memslot update counts and latency.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemslotReport {
    /// Requests made by the device manager.
    pub updates: u64,
    /// Of those, refused by design (the schedule expects the errno).
    pub refused: u64,
    /// `set_memory_region` latency percentiles, in nanoseconds.
    pub latency_ns: Percentiles,
    /// The final memslot generation.
    pub generation: u64,
    /// MMIO generation wraps.
    pub generation_wraps: u64,
    /// Host invalidations (MMU-notifier begin/end pairs) the device manager made
    /// (`--stress-paths`).
    pub host_invalidations: u64,
    /// The MMIO-generation wrap trap (`--wrap-trap`).
    pub wrap_trap: WrapTrapReport,
}

/// What the wrap trap did (see `machine`'s module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WrapTrapReport {
    /// The run was asked to set the trap (`--wrap-trap`).
    pub requested: bool,
    /// The DIMM was swept while its generation bits were 0.
    pub armed: bool,
    /// The generation when it was armed.
    pub armed_at: u64,
    /// The wrapping swap was made while vCPU 0 swept the DIMM.
    pub sprung: bool,
    /// The generation after the wrapping swap.
    pub sprung_at: u64,
    /// Dummy-slot swaps the device manager made to age the trap.
    pub swaps: u64,
    /// The dummy slot's GPA.
    pub dummy_slot_gpa: u64,
    /// Milliseconds from the start of the run to the end of the spring.
    pub sprung_after_ms: u64,
}

impl WrapTrapReport {
    /// The trap was asked for and did not spring (the run ended first, or it never armed): the
    /// run did not test what it was asked to.
    pub fn missed(&self) -> bool {
        self.requested && !self.sprung
    }
}

/// Latency percentiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
    /// How many values the percentiles are of (below 100, `p99` is the largest; below 10,
    /// `p90` is).
    pub samples: u64,
}

impl Percentiles {
    /// Percentiles of `h` (all 0 when it is empty).
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            samples: h.len(),
        }
    }
}

impl Report {
    /// Copies the MMU's counters into the report's `exits`, `mmu` and `memslots` groups.
    pub fn fill_mmu(&mut self, s: &MmuStats) {
        self.exits.mmu = s.exits;
        self.mmu = MmuReport {
            mmio_sptes_created: s.mmio_sptes_created,
            zaps: s.zaps,
            zap_all_fast: s.zap_all_fast,
            retries: s.retries,
            tlb_flush_requests: s.tlb_flush_requests,
            extra: s.counters.clone(),
        };
        self.memslots.generation = s.generation;
        self.memslots.generation_wraps = s.generation_wraps;
    }

    /// Total accesses over all vCPUs.
    pub fn total_accesses(&self) -> u64 {
        self.vcpus.iter().map(|v| v.accesses).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::Violation;

    #[test]
    fn json_has_the_stable_groups_and_keys() {
        let mut r = Report::default();
        r.vcpus.push(VcpuReport { index: 0, accesses: 10, ..VcpuReport::default() });
        r.oracle.push(Violation {
            vcpu: Some(1),
            gpa: Some("0xc0000040".into()),
            what: "BarRead of 8 bytes".into(),
            expected: "v0: MMIO exit".into(),
            seen: "RAM bar0+0x40".into(),
        });
        let v: serde_json::Value = serde_json::to_value(&r).expect("json");
        for key in [
            "config",
            "vcpus",
            "exits",
            "mmu",
            "memslots",
            "tlb",
            "tables",
            "oracle",
            "elapsed_seconds",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["oracle"]["violations"], 1);
        assert_eq!(v["oracle"]["first_violations"][0]["vcpu"], 1);
        assert!(v["config"]["mmio_caching"].get("reason").is_some());
        assert!(v["memslots"]["latency_ns"].get("p99").is_some());
        assert!(v["exits"].get("mmio_spte_hit").is_some());
        assert_eq!(v["vcpus"][0]["accesses"], 10);
    }

    #[test]
    fn percentiles_of_a_histogram() {
        let mut h = Histogram::<u64>::new(3).expect("histogram");
        for v in 1..=100u64 {
            h.record(v * 1000).expect("record");
        }
        let p = Percentiles::of(&h);
        assert!(p.p50 >= 49_000 && p.p50 <= 51_000, "{p:?}");
        assert!(p.max >= 100_000 && p.max < 100_100);
        assert_eq!(Percentiles::of(&Histogram::<u64>::new(3).expect("h")), Percentiles::default());
    }

    #[test]
    fn fill_mmu_copies_counters() {
        let mut s = MmuStats { mmio_sptes_created: 4, generation: 12, ..MmuStats::default() };
        s.exits.mmio_cache_hit = 3;
        s.counters = Some(MmuCounters { stale_gen_misses: 2, ..MmuCounters::default() });
        let mut r = Report::default();
        r.fill_mmu(&s);
        assert_eq!(
            (r.exits.mmu.mmio_cache_hit, r.mmu.mmio_sptes_created, r.memslots.generation),
            (3, 4, 12)
        );
        assert_eq!(r.mmu.extra.as_ref().map(|c| c.stale_gen_misses), Some(2));
        let v: serde_json::Value = serde_json::to_value(&r).expect("json");
        assert_eq!(v["mmu"]["extra"]["stale_gen_misses"], 2);
        assert_eq!(v["config"]["format"], "ept");
        let none: serde_json::Value = serde_json::to_value(Report::default()).expect("j");
        assert_eq!(none["mmu"]["extra"], serde_json::json!({}));
    }
}
