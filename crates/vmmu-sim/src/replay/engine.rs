//! Replays one trace on the software machine with the real MMU ([`RealMmu`]).
//!
//! One vCPU (v1 traces do not say which vCPU made an access, and the reference recordings have one)
//! runs on the calling thread: every access enters guest mode, polls its requests, looks up its
//! TLB, on a miss walks the MMU's tables and exits to the MMU's entry points, then leaves guest
//! mode. Under the shadow MMU the vCPU is a guest of its own (`shadow_guest`: no paging below 4
//! GiB, identity-mapped long mode above) and each access goes by guest-virtual address through the
//! shadow tables, with the same exits and retries. Memslot requests go to
//! [`vmmu::vm::Vm::set_memory_region`], which applies KVM's rules; the replay only mirrors what the
//! core accepted (by the [`MemslotChange`] it returns) to know where its own accesses go. Between
//! events the vCPU is outside guest mode, so an update never waits for it.
//!
//! Checks:
//! - every `slot` request must be accepted (it was on the recording host);
//! - every `mmio` access must end as MMIO (no slot, or a write to a read-only slot);
//! - right before every `slot` request the replay probes the slot's old range (first and last
//!   page) and the requested range (first, middle, last page), so the TLB, the SPTEs and the
//!   per-vCPU MMIO cache hold what the request must invalidate; right after it, the same pages
//!   (most recent first) and then each live slot of address space 0 (first, middle and last
//!   page; with more than `PROBE_ALL_MAX_SLOTS` live, that many in turn). A probe of a page in
//!   a slot: the host writes a fresh token into the slot's buffer and the guest must read it
//!   back; the guest writes another token and the host must find it in the buffer (or, in a
//!   read-only slot, the write must be MMIO and the buffer unchanged); every other live slot
//!   that maps the same host page (an alias) must read it too (up to `ALIAS_READS_MAX` of them
//!   per probe, in turn). Slots are looked up through an index (`super::live`), so a replay's
//!   cost grows with its length, not with the cube of its slots. A probe of
//!   a page in no slot must be MMIO. A stale translation or a stale "this is MMIO" shows up as
//!   a wrong value or a wrong kind of access (an oracle violation); `tests/replay_bugs.rs` shows
//!   re-injected historical bugs caught this way. The verdict on a probe's write
//!   (`own_write_ok`) and which slots are aliases (`aliases`) are functions of their own, tested
//!   without an MMU that misbehaves.

use super::identity::{nonpaging_cpu, IdentityError, IdentityTables, NONPAGING_LIMIT};
use super::inflight::InFlight;
use super::live::{Live, LiveSlots};
use super::memory::{MemoryError, TraceMemory};
use super::parse::{Dir, EventKind, Exit, MmioEvent, SlotEvent, Trace};
use super::report::{Misclassified, Refusal, RunReport, ZapDiff, KEEP};
use crate::host::SimHost;
use crate::hw_vcpu::{Attempts, Data, HwVcpu, Outcome as HwOutcome};
use crate::machine_paging::{shadow_access, GvaTlb, RamOp, ShadowAccess};
use crate::oracle::Violation;
use crate::ram::Width;
use crate::real::{RealMmu, RealMmuConfig};
use crate::seam::{AccessKind, GuestMmu};
use crate::timeline::{LatencyHistogram, Sample, Timeline};
use std::time::Instant;
use vmmu::bugs::BugSet;
use vmmu::dirty::DirtyLogMode;
use vmmu::memslot::{MemslotChange, UserspaceMemoryRegion};
use vmmu::spte::FormatKind;
use vmmu::types::{Gpa, Hva, PAGE_SIZE};
use vmmu::vm::{MmuKind, VmError};

/// One machine configuration to replay under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayConfig {
    /// The MMU. Under [`MmuKind::Shadow`] the vCPU runs without paging, or in long mode on
    /// identity-mapped guest page tables ([`super::identity`]) when the trace reaches above
    /// 4 GiB, and `format` is [`FormatKind::Npt`] (x86 page-table SPTEs).
    pub mmu: MmuKind,
    /// The SPTE format.
    pub format: FormatKind,
    /// The user's wish for MMIO caching.
    pub mmio_caching: bool,
    /// Host MAXPHYADDR.
    pub phys_bits: u8,
    /// Historical KVM bugs to re-inject (empty normally; effective only with the
    /// `historical-bugs` feature), to show that the replay's checks catch them.
    pub bugs: BugSet,
}

/// The host MAXPHYADDR a replay uses unless the trace needs more ([`phys_bits_for`]).
pub const DEFAULT_PHYS_BITS: u8 = 46;

/// The highest guest-physical byte `trace` names: the last byte of a slot request (deletes
/// included, they name the old range) or of an MMIO access; `None` for a trace without either.
pub fn highest_gpa(trace: &Trace) -> Option<u64> {
    highest_reached(trace, |_| true)
}

/// The last byte of the trace's highest MMIO access or non-delete slot request that `counts`.
fn highest_reached(trace: &Trace, counts: impl Fn(&SlotEvent) -> bool) -> Option<u64> {
    trace
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Slot(s) if s.size > 0 && counts(&s) => {
                Some(s.gpa.saturating_add(s.size - 1))
            }
            EventKind::Mmio(m) => Some(m.gpa.saturating_add(m.len.max(1) - 1)),
            _ => None,
        })
        .max()
}

/// The last byte of the trace's highest MMIO access or slot request that some host could have
/// accepted ([`phys_bits_for`] reads the recording host's width from it). A request no host
/// accepts by its shape was refused on the recording host too, whatever its MAXPHYADDR: it says
/// nothing about that host's width (and must not turn MMIO caching off for the whole run, as 52
/// bits would under NPT).
pub fn highest_telling_gpa(trace: &Trace) -> Option<u64> {
    highest_reached(trace, super::memory::acceptable_somewhere)
}

/// The host MAXPHYADDR to replay `trace` with when the user names none: [`DEFAULT_PHYS_BITS`],
/// or as many bits as the trace's highest guest-physical address needs, at most 52. Every
/// recorded slot request succeeded (one that no host accepts by its shape is left out), and a
/// TDP host accepts a slot only below its own MAXPHYADDR
/// (KVM's `kvm_mmu_max_gfn`), so a trace with a 64-bit BAR mapped at 2^47 comes from a host with
/// at least 48 bits; replaying it with 46 would refuse a request the recording host accepted.
pub fn phys_bits_for(trace: &Trace) -> u8 {
    let needed = highest_telling_gpa(trace).map_or(0, |last| 64 - last.leading_zeros());
    u8::try_from(needed).unwrap_or(52).clamp(DEFAULT_PHYS_BITS, 52)
}

impl ReplayConfig {
    /// `format` with MMIO caching on or off, `phys_bits` [`DEFAULT_PHYS_BITS`], no bugs.
    pub fn new(format: FormatKind, mmio_caching: bool) -> ReplayConfig {
        ReplayConfig {
            mmu: MmuKind::Tdp,
            format,
            mmio_caching,
            phys_bits: DEFAULT_PHYS_BITS,
            bugs: BugSet::NONE,
        }
    }

    /// The shadow MMU (KVM with TDP off, as on the hosts the reference traces come from), MMIO
    /// caching on or off, `phys_bits` [`DEFAULT_PHYS_BITS`], no bugs.
    pub fn shadow(mmio_caching: bool) -> ReplayConfig {
        ReplayConfig { mmu: MmuKind::Shadow, ..ReplayConfig::new(FormatKind::Npt, mmio_caching) }
    }

    /// Every machine configuration a trace replays under unless the user picks some, in report
    /// order (`ept-on`, `ept-off`, `npt-on`, `npt-off`, `shadow-on`, `shadow-off`), with host
    /// MAXPHYADDR `phys_bits` (usually [`phys_bits_for`] the trace).
    pub fn every(phys_bits: u8) -> Vec<ReplayConfig> {
        let tdp = [FormatKind::Ept, FormatKind::Npt]
            .into_iter()
            .flat_map(|format| [true, false].map(|caching| ReplayConfig::new(format, caching)));
        tdp.chain([true, false].map(ReplayConfig::shadow))
            .map(|cfg| ReplayConfig { phys_bits, ..cfg })
            .collect()
    }

    /// `ept-on`, `npt-off`, `shadow-on`, ...
    pub fn name(&self) -> String {
        let f = match (self.mmu, self.format) {
            (MmuKind::Shadow, _) => "shadow",
            (MmuKind::Tdp, FormatKind::Ept) => "ept",
            (MmuKind::Tdp, FormatKind::Npt) => "npt",
            (MmuKind::Tdp, FormatKind::NptSev { .. }) => "npt-sev",
        };
        format!("{f}-{}", if self.mmio_caching { "on" } else { "off" })
    }
}

/// Why a replay could not run at all (a verdict is never an error).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Host memory for the trace's slots.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be built.
    #[error("cannot build the VM: {0}")]
    Vm(#[from] VmError),
    /// The shadow replay's guest page tables could not be set up.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The shadow replay's guest could not be set up (its page-table slot or its CR3).
    #[error("cannot set up the shadow replay's guest: {0}")]
    Guest(String),
    /// The replay's host had no frame left for a page table, so the MMU failed accesses with
    /// its out-of-memory error: a limit of the replay, not something the trace did.
    #[error(
        "the replay's host ran out of frames for page tables ({live} in use, {exhausted} \
         requests refused): the MMU failed accesses for want of memory, which the recording \
         host did not"
    )]
    OutOfTableFrames {
        /// Table pages in use at the end.
        live: u64,
        /// Table allocations refused.
        exhausted: u64,
    },
}

/// What one vCPU access did.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// RAM; the value loaded or stored (0 when the access was not performed).
    Ram(u64),
    /// MMIO emulation.
    Mmio,
    /// The MMU failed the access.
    Error(String),
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Ram(v) => format!("RAM {v:#x}"),
            Outcome::Mmio => "MMIO".into(),
            Outcome::Error(e) => format!("error: {e}"),
        }
    }
}

/// The replay's single vCPU: the machine's simulated hardware vCPU ([`HwVcpu`]: requests and
/// kicks, TLB, the MMU's walk and exits, one retry policy), dropped at the end so its counters
/// reach the MMU's totals. Under the shadow MMU its accesses go by guest-virtual address
/// (identity-mapped) through the shadow tables, with a TLB of guest-virtual pages.
struct Cpu<'a> {
    hw: Option<HwVcpu<'a, RealMmu>>,
    /// Under the shadow MMU: the guest-virtual TLB, and the identity tables of a long-mode
    /// guest (`None`: the guest runs without paging, GVA = GPA).
    shadow: Option<(GvaTlb, Option<IdentityTables>)>,
    host: &'a SimHost,
    /// Under a TDP MMU: the guest-physical bits its tables translate, 48 with a 4-level root,
    /// 57 with a 5-level one (read from the VM's TDP configuration, which picks 5 levels above a
    /// 48-bit MAXPHYADDR).
    tdp_gpa_bits: u32,
}

/// The replay's retry policy: [`Attempts`] with a limit of [`SEQUENTIAL_RETRY_LIMIT`].
struct Sequential;

/// Counted retries in a row before a replay access fails as a livelock. The replay runs one
/// vCPU and applies every event between its accesses, so no other thread can end a retry
/// streak: an access that retries this often retries forever (a re-injected bug can do that),
/// and waiting for the machine's general limit (`RETRY_LIMIT`, a million) only costs seconds
/// per access.
const SEQUENTIAL_RETRY_LIMIT: u32 = 10_000;

impl Attempts for Sequential {
    fn limit(&self) -> u32 {
        SEQUENTIAL_RETRY_LIMIT
    }
}

impl Cpu<'_> {
    /// Whether this vCPU can form guest-physical address `gpa` at all: below what the TDP
    /// tables translate, or where the shadow replay's guest maps it (below 4 GiB without
    /// paging). A slot request beyond that (refused by its shape, or by this run's MAXPHYADDR)
    /// has nothing there for a guest to reach, so nothing to check.
    fn forms(&self, gpa: u64) -> bool {
        match &self.shadow {
            Some((_, Some(tables))) => tables.gva(gpa).is_some(),
            Some((_, None)) => gpa < NONPAGING_LIMIT,
            None => gpa >> self.tdp_gpa_bits == 0,
        }
    }

    /// One guest access. `perform`: touch RAM (own accesses, naturally aligned); recorded MMIO
    /// accesses are only classified.
    fn access(&mut self, gpa: u64, width: Width, write: Option<u64>, perform: bool) -> Outcome {
        let Some(hw) = self.hw.as_mut() else {
            return Outcome::Error("the vCPU is gone".into());
        };
        if let Some((tlb, tables)) = self.shadow.as_mut() {
            let op = match (perform && width.is_aligned(gpa), write) {
                (true, None) => RamOp::Load,
                (true, Some(v)) => RamOp::Store(v),
                (false, w) => RamOp::Classify(AccessKind::from_write(w.is_some())),
            };
            let width = if width.is_aligned(gpa) { width } else { Width::W1 };
            // Every retry counts towards the livelock limit: no update can be in flight while
            // the replay's only vCPU runs (events are applied between its accesses).
            let attempt = || true;
            let gva = match tables.as_ref().map_or(Some(gpa), |t| t.gva(gpa)) {
                Some(gva) => gva,
                None => {
                    return Outcome::Error(format!(
                        "the shadow replay's guest maps nothing at guest-physical {gpa:#x} (no \
                         x86 guest reaches 2^52 or above)"
                    ))
                }
            };
            hw.enter_guest();
            let r = match shadow_access(hw, self.host, tlb, gva, width, op, attempt) {
                ShadowAccess::Ram { value, .. } => Outcome::Ram(value),
                ShadowAccess::Mmio(_) => Outcome::Mmio,
                ShadowAccess::PageFault(e) => {
                    Outcome::Error(format!("guest page fault (error code {e:#x})"))
                }
                ShadowAccess::Error(e) => Outcome::Error(e),
            };
            hw.exit_guest();
            return r;
        }
        if gpa >> self.tdp_gpa_bits != 0 {
            // The walk indexes bits below `tdp_gpa_bits` only: it would find the RAM at the
            // address cut to them. No guest of this host forms such an address (its MAXPHYADDR
            // is at most the host's): a trace replayed below the MAXPHYADDR it needs.
            return Outcome::Error(format!(
                "the TDP tables map nothing at guest-physical {gpa:#x} (they translate {} bits; \
                 no guest of this host forms it)",
                self.tdp_gpa_bits
            ));
        }
        hw.enter_guest();
        let gpa = Gpa(gpa);
        let r = if perform && width.is_aligned(gpa.0) {
            match hw.load_store_with(gpa, width, write, &mut Sequential) {
                Data::Ram { value, .. } => Outcome::Ram(value),
                Data::Mmio => Outcome::Mmio,
                Data::Error(e) => Outcome::Error(e.to_string()),
            }
        } else {
            match hw.access_with(gpa, AccessKind::from_write(write.is_some()), &mut Sequential) {
                HwOutcome::Ram(_) => Outcome::Ram(0),
                HwOutcome::Mmio => Outcome::Mmio,
                HwOutcome::Error(e) => Outcome::Error(e.to_string()),
            }
        };
        hw.exit_guest();
        r
    }
}

/// The most live slots `Replay::probe_all` probes after one slot request. A trace with more
/// (KVM allows 32764 per address space; QEMU's virtio-mem can use over a thousand) has them
/// probed in turn, this many after each request, so a replay stays linear in the trace's length
/// rather than quadratic in its slots. Above the most any recorded boot has live (about 130).
const PROBE_ALL_MAX_SLOTS: usize = 256;

/// The most aliases one probe reads back through. A page with more (a trace that maps one host
/// buffer at hundreds of gpas) has them read in turn, this many per probe.
const ALIAS_READS_MAX: usize = 16;

/// The replay of one trace under one configuration.
struct Replay<'a> {
    cpu: Cpu<'a>,
    mmu: &'a RealMmu,
    memory: &'a TraceMemory,
    live: LiveSlots,
    /// The window of the latest slot request, in which another vCPU's recorded access may
    /// still have seen the old map.
    in_flight: InFlight,
    /// The slot id the next capped round of `probe_all` starts at.
    probe_cursor: u16,
    /// Where in a page's list of aliases the next capped read-back starts.
    alias_turn: usize,
    report: RunReport,
    latencies: Vec<u64>,
    /// MMIO handling latency of the recorded MMIO accesses that ended as MMIO.
    mmio_latencies: Vec<u64>,
    tokens: Tokens,
    /// A delete or move was the last slot request and no annotation followed yet.
    pending_zap: bool,
    /// Per-request zap comparison (shadow runs): the line of the last slot request (0 before
    /// the first), our `zap_all_fast` calls during it, and the annotations recorded since.
    zap_cmp: Option<ZapCmp>,
}

/// The values the replay's probes write, and where in a page they write them.
#[derive(Debug, Default)]
struct Tokens {
    /// How many tokens were handed out.
    issued: u64,
}

impl Tokens {
    /// A token never handed out before, so that a read through a stale translation cannot find
    /// it where it looks, distinct from zero and from small values a buffer may hold.
    fn next(&mut self) -> u64 {
        self.issued += 1;
        0x5eed_0000_0000_0000 | self.issued
    }

    /// The offset in its page of the word the next probe uses: it moves by a word with each
    /// token and goes round all 512 words of the page.
    fn word_offset(&self) -> u64 {
        (self.issued % 512) * 8
    }
}

/// The slot request the recorded `zap_all_fast` annotations are being counted against.
#[derive(Clone, Copy, Debug, Default)]
struct ZapCmp {
    line: usize,
    ours: u64,
    recorded: u64,
}

fn violation(
    gpa: u64,
    what: impl Into<String>,
    expected: impl Into<String>,
    seen: String,
) -> Violation {
    Violation {
        vcpu: Some(0),
        gpa: Some(format!("{gpa:#x}")),
        what: what.into(),
        expected: expected.into(),
        seen,
    }
}

impl Replay<'_> {
    fn check(&mut self, ok: bool, v: impl FnOnce() -> Violation) {
        self.report.oracle.checked += 1;
        if !ok {
            self.report.oracle.push(v());
        }
    }

    /// Compares the annotations recorded after the last slot request with our `zap_all_fast`
    /// calls during it (shadow runs), and starts counting against `next` (line, ours).
    fn settle_zaps(&mut self, next: Option<(usize, u64)>) {
        let Some(c) = self.zap_cmp else { return };
        let z = &mut self.report.zaps;
        if c.recorded == c.ours {
            z.requests_matching += 1;
        } else {
            z.requests_differing += 1;
            if z.first_differing.len() < KEEP {
                z.first_differing.push(ZapDiff {
                    line: c.line,
                    recorded: c.recorded,
                    ours: c.ours,
                });
            }
        }
        if let Some((line, ours)) = next {
            self.zap_cmp = Some(ZapCmp { line, ours, recorded: 0 });
        }
    }

    fn slot(&mut self, line: usize, s: &SlotEvent) {
        self.in_flight.slot(s);
        let r = &mut self.report.slots;
        r.requests += 1;
        let userspace_addr = match self.memory.hva(s.uaddr) {
            Some(hva) => hva,
            None if s.size == 0 => super::memory::delete_uaddr(s.uaddr),
            None => s.uaddr,
        };
        let flags = u32::from(s.dirty_log) | (u32::from(s.readonly) << 1);
        let region = UserspaceMemoryRegion {
            slot: (u32::from(s.as_id) << 16) | u32::from(s.id),
            flags,
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr,
        };
        let key = (s.as_id, s.id);
        let old = self.live.get(key);
        let warm = self.warm_pages(old, s);
        for &page in &warm {
            self.probe(page);
        }
        let vm = self.mmu.vm();
        let before = vm.stats();
        let t0 = Instant::now();
        let result = vm.set_memory_region(&region);
        let ns = t0.elapsed().as_nanos() as u64;
        let after = vm.stats();
        self.settle_zaps(Some((line, after.zap_all_fast - before.zap_all_fast)));
        self.pending_zap = false;
        let change = match result {
            Ok(c) => c,
            Err(e) => {
                let r = &mut self.report.slots;
                r.refused += 1;
                if r.first_refusals.len() < KEEP {
                    r.first_refusals.push(Refusal {
                        line,
                        slot: format!("{}/{}", s.as_id, s.id),
                        errno: e.errno().to_string(),
                        reason: e.to_string(),
                    });
                }
                return;
            }
        };
        self.latencies.push(ns);
        self.report.events_applied += 1;
        let r = &mut self.report.slots;
        r.applied += 1;
        let new = Live {
            gpa: s.gpa,
            size: s.size,
            hva: userspace_addr,
            readonly: s.readonly,
            dirty_log: s.dirty_log,
        };
        match change {
            MemslotChange::Create => {
                r.creates += 1;
                // The host buffer behind the slot (its first address): only slots of one
                // buffer can alias each other.
                let buffer = self
                    .memory
                    .host()
                    .locate(Hva(userspace_addr))
                    .map_or(userspace_addr, |(_, off)| userspace_addr - off);
                self.live.create(key, new, buffer);
            }
            MemslotChange::Delete => {
                r.deletes += 1;
                self.live.delete(key);
            }
            MemslotChange::Move => {
                r.moves += 1;
                self.live.move_to(key, s.gpa, s.dirty_log);
            }
            MemslotChange::FlagsOnly => {
                r.flags_only += 1;
                self.live.set_dirty_log(key, s.dirty_log);
            }
            MemslotChange::NoOp => r.no_ops += 1,
        }
        if matches!(change, MemslotChange::Delete | MemslotChange::Move) {
            let z = &mut self.report.zaps;
            z.deletes_and_moves += 1;
            z.zap_all_fast += after.zap_all_fast - before.zap_all_fast;
            z.zap_range += after.zap_range - before.zap_range;
            z.table_pages_zapped += (after.mmu_shadow_zapped + after.tdp_tables_zapped)
                - (before.mmu_shadow_zapped + before.tdp_tables_zapped);
            self.pending_zap = true;
        }
        // The pages warmed before the request first, most recent first (the per-vCPU MMIO
        // cache holds the last MMIO gfn), then every live slot.
        for &page in warm.iter().rev() {
            self.probe(page);
        }
        self.probe_all();
    }

    /// Pages to access right before a slot request, so that the TLB, the SPTEs (RAM or MMIO)
    /// and the per-vCPU MMIO cache hold what the request must invalidate: the first and last
    /// page of the slot's old range, then the first, middle and last page of the requested
    /// range (address space 0 only: the vCPU is not in SMM), less pages the vCPU cannot form
    /// ([`Cpu::forms`]: a request that no host, or not this run's, accepts may name them).
    fn warm_pages(&self, old: Option<Live>, s: &SlotEvent) -> Vec<u64> {
        let mut pages = Vec::new();
        if s.as_id != 0 {
            return pages;
        }
        if let Some(o) = old {
            pages.extend([o.gpa, o.gpa + o.size - PAGE_SIZE]);
        }
        pages.extend(first_middle_last(s.gpa, s.size).into_iter().flatten());
        pages.retain(|&p| self.cpu.forms(p));
        pages.dedup();
        pages
    }

    /// The replay's own accesses to every live slot of address space 0 after an applied slot
    /// request.
    fn probe_all(&mut self) {
        for l in self.live.round(&mut self.probe_cursor, PROBE_ALL_MAX_SLOTS) {
            for page in first_middle_last(l.gpa, l.size).into_iter().flatten() {
                self.probe(page);
            }
        }
    }

    /// Checks RAM or MMIO at a page: `page` is page aligned; the word in it varies.
    fn probe(&mut self, page: u64) {
        let gpa = page + self.tokens.word_offset();
        let Some((id, slot)) = self.live.covering(gpa) else {
            self.report.own_accesses.hole_reads += 1;
            let seen = self.cpu.access(gpa, Width::W8, None, true);
            self.check(seen == Outcome::Mmio, || {
                violation(gpa, "read where no slot is", "MMIO", seen.describe())
            });
            return;
        };
        let hva = slot.hva + (gpa - slot.gpa);
        let Some((buf, off)) = self.memory.host().locate(Hva(hva)) else {
            self.check(false, || {
                violation(
                    gpa,
                    "own access",
                    "host memory behind the slot",
                    format!("none at hva {hva:#x}"),
                )
            });
            return;
        };
        let t1 = self.tokens.next();
        if let Err(e) = buf.write(off, Width::W8, t1) {
            // Cannot happen: the word is aligned and inside the slot's union of ranges.
            self.check(false, || {
                violation(gpa, "host write of a probe token", "success", e.to_string())
            });
            return;
        }
        self.report.own_accesses.reads += 1;
        let seen = self.cpu.access(gpa, Width::W8, None, true);
        self.check(seen == Outcome::Ram(t1), || {
            violation(
                gpa,
                "read after the host wrote the slot's buffer",
                format!("RAM {t1:#x}"),
                seen.describe(),
            )
        });
        let t2 = self.tokens.next();
        self.report.own_accesses.writes += 1;
        let seen = self.cpu.access(gpa, Width::W8, Some(t2), true);
        let host = buf.read(off, Width::W8).unwrap_or(0);
        let ok = own_write_ok(slot.readonly, &seen, host, t1, t2);
        let now = if slot.readonly {
            self.check(ok, || {
                violation(
                    gpa,
                    "write to a read-only slot",
                    format!("MMIO, buffer still {t1:#x}"),
                    format!("{}, buffer {host:#x}", seen.describe()),
                )
            });
            t1
        } else {
            self.check(ok, || {
                violation(
                    gpa,
                    "write, then host read of the slot's buffer",
                    format!("RAM, buffer {t2:#x}"),
                    format!("{}, buffer {host:#x}", seen.describe()),
                )
            });
            t2
        };
        let aliases = self.live.aliases(id, hva, gpa);
        let n = aliases.len();
        let start = if n > ALIAS_READS_MAX { self.alias_turn % n } else { 0 };
        self.alias_turn = self.alias_turn.wrapping_add(ALIAS_READS_MAX);
        for alias in aliases.into_iter().cycle().skip(start).take(n.min(ALIAS_READS_MAX)) {
            self.report.own_accesses.alias_reads += 1;
            let seen = self.cpu.access(alias, Width::W8, None, true);
            self.check(seen == Outcome::Ram(now), || {
                violation(
                    alias,
                    format!("read through an alias of {gpa:#x}"),
                    format!("RAM {now:#x}"),
                    seen.describe(),
                )
            });
        }
    }

    fn mmio(&mut self, line: usize, m: &MmioEvent) {
        let r = &mut self.report.mmio;
        r.events += 1;
        match m.exit {
            Exit::User => r.exit_user += 1,
            Exit::Kernel => r.exit_kernel += 1,
        }
        let width = Width::from_bytes(m.len).unwrap_or(Width::W1);
        let write = match m.dir {
            Dir::Read => None,
            Dir::Write => Some(m.value.unwrap_or(0)),
        };
        let readonly_write =
            write.is_some() && self.live.covering(m.gpa).is_some_and(|(_, l)| l.readonly);
        // Recorded accesses are classified, never performed on RAM: a misclassified one must not
        // corrupt the buffers the oracle reads.
        let t0 = Instant::now();
        let seen = self.cpu.access(m.gpa, width, write, false);
        if seen == Outcome::Mmio {
            self.mmio_latencies.push(t0.elapsed().as_nanos() as u64);
        }
        self.report.events_applied += 1;
        let r = &mut self.report.mmio;
        if seen == Outcome::Mmio {
            r.classified_mmio += 1;
            r.readonly_writes += u64::from(readonly_write);
        } else if self.in_flight.may_have_raced(m.gpa, write.is_some()) {
            r.raced_slot_request += 1;
            if r.first_raced.len() < KEEP {
                let seen = seen.describe();
                r.first_raced.push(Misclassified::new(line, m.gpa, write.is_some(), seen));
            }
        } else {
            r.misclassified += 1;
            if r.first_misclassified.len() < KEEP {
                let seen = seen.describe();
                r.first_misclassified.push(Misclassified::new(line, m.gpa, write.is_some(), seen));
            }
        }
    }

    /// The timeline's sample at recorded time `t_us`: accesses are every access the vCPU made,
    /// the replay's own (reads and writes of slots, reads through aliases, reads where no slot
    /// is) and the recorded MMIO, updates the applied slot requests, exits the vCPU's own
    /// counters.
    fn sample(&mut self, t_us: u64) -> Sample {
        let r = &self.report;
        let exits = match self.cpu.hw.as_mut() {
            Some(hw) => self.mmu.vcpu_exits(hw.state()),
            None => Default::default(),
        };
        let o = &r.own_accesses;
        Sample {
            t_us,
            accesses: o.reads + o.writes + o.alias_reads + o.hole_reads + r.mmio.events,
            updates: r.slots.applied,
            exits,
        }
    }

    /// One dirty-log call, applied to the core: a GET, or (`clear = Some((first, count))`) a
    /// CLEAR with every bit of the range set (the recorded bitmap is not in the trace).
    fn dirty_log(&mut self, line: usize, as_id: u16, id: u16, clear: Option<(u64, u32)>) {
        self.in_flight.dirty_log_call();
        let logged = self.live.get((as_id, id)).is_some_and(|l| l.dirty_log);
        let slot = (u32::from(as_id) << 16) | u32::from(id);
        let result = match clear {
            Some((first, count)) => {
                self.report.dirty_log.clear += 1;
                self.mmu.clear_dirty_log(slot, first, count, None).map(|r| r.map(|()| 0))
            }
            None => {
                self.report.dirty_log.get += 1;
                self.mmu
                    .get_dirty_log(slot)
                    .map(|r| r.map(|w| vmmu::dirty::pages_of(&w).count() as u64))
            }
        };
        let d = &mut self.report.dirty_log;
        d.on_logged_slot += u64::from(logged);
        match result {
            Some(Ok(pages)) => {
                d.accepted += 1;
                d.pages += pages;
            }
            Some(Err(errno)) => {
                d.refused += 1;
                if d.first_refusals.len() < KEEP {
                    let what = if clear.is_some() { "clear-dirty-log" } else { "get-dirty-log" };
                    d.first_refusals
                        .push(format!("line {line}: {what} as {as_id} id {id}: {errno}"));
                }
            }
            None => {}
        }
    }
}

/// Whether the replay's own store of `written` did what its slot requires, from what the access
/// did (`seen`) and what the host then reads in the slot's buffer (`host`), which held `before`:
/// in a read-only slot an emulated write (MMIO) that leaves the buffer at `before`; elsewhere a
/// RAM store of `written` that lands in the buffer. Each half alone is no proof: a store through a
/// stale translation reaches RAM but another frame, and an access reported as MMIO may still have
/// written the buffer.
fn own_write_ok(readonly: bool, seen: &Outcome, host: u64, before: u64, written: u64) -> bool {
    if readonly {
        *seen == Outcome::Mmio && host == before
    } else {
        *seen == Outcome::Ram(written) && host == written
    }
}

/// The first, middle and last page of `[gpa, gpa + size)` (the same page more than once in a
/// range of fewer than three pages), which the replay probes around a slot request for the
/// requested range, whether or not the core accepts it (`Replay::warm_pages`), and after it in
/// every live slot (`Replay::probe_all`); none for a range without a whole page, an unaligned
/// start or a range past 2^64.
pub(super) fn first_middle_last(gpa: u64, size: u64) -> Option<[u64; 3]> {
    let n = size / PAGE_SIZE;
    (n > 0 && gpa % PAGE_SIZE == 0 && gpa.checked_add(size).is_some())
        .then(|| [0, n / 2, n - 1].map(|p| gpa + p * PAGE_SIZE))
}

/// Replays `trace` under `cfg` and reports.
pub fn replay(trace: &Trace, cfg: &ReplayConfig) -> Result<RunReport, ReplayError> {
    let memory = TraceMemory::new(trace, cfg.phys_bits)?;
    let uses_smm = trace.uses_address_space_1();
    let shadow = cfg.mmu == MmuKind::Shadow;
    let mmu_cfg = RealMmuConfig {
        format: if shadow { FormatKind::Npt } else { cfg.format },
        phys_bits: cfg.phys_bits,
        mmio_caching: cfg.mmio_caching,
        vcpus: 1,
        generation_base: 0,
        // The recording host's shadow MMU zaps everything on a delete or move (KVM's default
        // KVM_X86_QUIRK_SLOT_ZAP_ALL), which the trace's zap annotations record; the shadow
        // replay does the same so that its zaps compare. A TDP MMU zaps the slot's range.
        slot_zap_all: shadow,
        bugs: cfg.bugs,
        tdp_prefetch: false,
        shadow_mmio_path_only: false,
        shadow_pages: None,
    };
    let nr_as = if uses_smm { 2 } else { 1 };
    let mmu = if shadow {
        RealMmu::shadow(memory.host().clone(), mmu_cfg, nr_as)?
    } else {
        RealMmu::with_address_spaces(memory.host().clone(), mmu_cfg, nr_as)?
    };
    let mut hw = HwVcpu::with_state(&mmu, memory.host(), mmu.create_vcpu(0), 64);
    let guest = if shadow { Some(shadow_guest(trace, &memory, &mmu, &mut hw, cfg)?) } else { None };
    let guest_note = guest.as_ref().map(|(_, note)| note.clone());
    let caching = mmu.mmio_caching();
    let mut r = Replay {
        cpu: Cpu {
            hw: Some(hw),
            shadow: guest.map(|(tables, _)| (GvaTlb::default(), tables)),
            host: memory.host(),
            // A root's 512 entries cover 9 bits above those of one of its entries.
            tdp_gpa_bits: mmu.vm().core().config().root_level.shift() + 9,
        },
        mmu: &mmu,
        memory: &memory,
        live: LiveSlots::default(),
        in_flight: InFlight::new(trace.summary.as_ref().and_then(|s| s.vcpu_threads)),
        probe_cursor: 0,
        alias_turn: 0,
        report: RunReport {
            config: cfg.name(),
            guest: guest_note,
            phys_bits: cfg.phys_bits,
            mmio_caching_effective: caching.effective,
            mmio_caching_reason: caching.reason,
            host_buffers: memory.buffers() as u64,
            host_bytes: memory.bytes(),
            host_frames_on_demand: memory.frames_on_demand(),
            ..RunReport::default()
        },
        latencies: Vec::new(),
        mmio_latencies: Vec::new(),
        tokens: Tokens::default(),
        pending_zap: false,
        zap_cmp: shadow.then(ZapCmp::default),
    };
    r.report.zaps.per_request = shadow;
    // The timeline runs on the trace's recorded clock: about 500 samples over the trace.
    let last_t = trace.events.last().map_or(0, |e| e.t_us);
    let interval_us = (last_t / 500).max(1000);
    let mut samples = vec![Sample::default()];
    let mut next_sample = interval_us;
    // As the recording VMM did (and the KVM side of the replay does): manual protect with
    // "initially set" (QEMU 7.2's choice where the kernel offers it) when the trace clears. GETs
    // return what the replay's own writes dirtied (and the initial bits), not the recording's
    // pages, which traces do not hold.
    let manual = trace.events.iter().any(|e| matches!(e.kind, EventKind::ClearDirtyLog { .. }));
    let mode = if manual { DirtyLogMode::InitiallySet } else { DirtyLogMode::Auto };
    r.report.dirty_log.applied = mmu.set_dirty_log_mode(mode);
    r.report.dirty_log.note = format!(
        "applied to the core's dirty log, {}; clears with every bit of the range set",
        if manual { "manual protect, initially set" } else { "auto protect" }
    );
    for e in &trace.events {
        match &e.kind {
            EventKind::Slot(s) => r.slot(e.line, s),
            EventKind::Mmio(m) => r.mmio(e.line, m),
            EventKind::GetDirtyLog { as_id, id } => {
                r.dirty_log(e.line, *as_id, *id, None);
                r.report.events_applied += 1;
            }
            EventKind::ClearDirtyLog { as_id, id, first_page, num_pages } => {
                r.dirty_log(e.line, *as_id, *id, Some((*first_page, *num_pages)));
                r.report.events_applied += 1;
            }
            EventKind::KvmZapAllFast => {
                r.report.zaps.recorded_zap_all_fast += 1;
                if let Some(c) = &mut r.zap_cmp {
                    c.recorded += 1;
                }
                if std::mem::take(&mut r.pending_zap) {
                    r.report.zaps.recorded_after_delete += 1;
                }
                r.report.events_applied += 1;
            }
        }
        if e.t_us >= next_sample {
            samples.push(r.sample(e.t_us));
            next_sample = (e.t_us - e.t_us % interval_us).saturating_add(interval_us);
        }
    }
    samples.push(r.sample(last_t));
    r.settle_zaps(None);
    // The vCPU adds its counters to the MMU's totals when it is dropped.
    r.cpu.hw = None;
    let stats = mmu.stats();
    let counters = stats.counters.clone().unwrap_or_default();
    let mut report = r.report;
    report.timeline = Some(Timeline {
        clock: "recorded time".into(),
        interval_us,
        samples,
        update_latency: LatencyHistogram::of_samples(&r.latencies),
        mmio_latency: LatencyHistogram::of_samples(&r.mmio_latencies),
    });
    report.memslot_update = super::report::Latency::of(r.latencies);
    report.zaps.zap_all_fast_total = stats.zap_all_fast;
    let tables = memory.host().table_stats();
    if tables.exhausted > 0 {
        return Err(ReplayError::OutOfTableFrames {
            live: tables.live,
            exhausted: tables.exhausted,
        });
    }
    report.mmio_paths = super::report::MmioPaths {
        mmio_spte_hit: stats.exits.mmio_spte_hit,
        vcpu_cache_hit: stats.exits.mmio_cache_hit,
        slow_path: stats.exits.mmio_slow_path,
        readonly_write: counters.readonly_write_emulations,
        mmio_sptes_created: stats.mmio_sptes_created,
        stale_generation: counters.stale_gen_misses,
        violation_exits: stats.exits.violation,
        misconfig_exits: stats.exits.misconfig,
    };
    Ok(report)
}

/// Sets up the shadow replay's guest, and says how in a line for the report. A trace that
/// stays below 4 GiB runs without guest paging (GVA = GPA), as firmware such as SeaBIOS does:
/// KVM then walks a special root of four direct shadow pages (shadow facts §6.1), and so does
/// this MMU. Above, a guest without paging cannot reach, so the guest runs in long mode on
/// identity-mapped tables ([`IdentityTables`]) in KVM's internal identity-page-table slot, CR3
/// pointing at them.
fn shadow_guest(
    trace: &Trace,
    memory: &TraceMemory,
    mmu: &RealMmu,
    hw: &mut HwVcpu<'_, RealMmu>,
    cfg: &ReplayConfig,
) -> Result<(Option<IdentityTables>, String), ReplayError> {
    let v = mmu
        .shadow_vcpu(hw.state())
        .ok_or_else(|| ReplayError::Guest("the VM does not use the shadow MMU".into()))?;
    if highest_gpa(trace).is_none_or(|last| last < NONPAGING_LIMIT) {
        v.set_guest_cpu(nonpaging_cpu(cfg.phys_bits))
            .map_err(|e| ReplayError::Guest(e.to_string()))?;
        return Ok((
            None,
            "no paging (GVA = GPA) on a special root, as firmware below 4 GiB".into(),
        ));
    }
    let tables = IdentityTables::build(trace, memory.host(), cfg.phys_bits)?;
    mmu.vm().set_internal_memory_region(&tables.region).map_err(|e| {
        ReplayError::Guest(format!("the page-table slot {:?} was refused: {e}", tables.region))
    })?;
    let v = mmu
        .shadow_vcpu(hw.state())
        .ok_or_else(|| ReplayError::Guest("the VM does not use the shadow MMU".into()))?;
    v.set_guest_cpu(tables.guest_cpu()).map_err(|e| ReplayError::Guest(e.to_string()))?;
    v.load_cr3(tables.cr3).map_err(|e| ReplayError::Guest(e.to_string()))?;
    let note = format!(
        "long mode, identity-mapped with 1 GiB pages (the trace reaches above 4 GiB); tables at \
         {:#x} in KVM's internal identity-page-table slot ({})",
        tables.cr3,
        tables.region.slot.id().0
    );
    Ok((Some(tables), note))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::parse::parse;

    const HEADER: &str = "{\"vmmu_trace\":1,\"source\":\"test\"}\n";

    fn slot(gpa: &str, size: &str) -> String {
        format!("{{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[],\"gpa\":\"{gpa}\",\"size\":\"{size}\",\"uaddr\":\"0x7f0000000000\"}}\n")
    }

    fn mmio(gpa: &str) -> String {
        format!("{{\"t\":0.000000,\"op\":\"mmio\",\"dir\":\"read\",\"gpa\":\"{gpa}\",\"len\":8,\"value\":\"0x0\",\"exit\":\"user\"}}\n")
    }

    fn bits(lines: &[String]) -> u8 {
        phys_bits_for(&parse(&format!("{HEADER}{}", lines.concat())).expect("trace"))
    }

    /// A `slot` line: address space `as_id`, slot `id`, `flags` (JSON strings), `gpa`, `size`,
    /// `uaddr`.
    fn slot_line(as_id: u16, id: u16, flags: &str, gpa: &str, size: &str, uaddr: &str) -> String {
        format!("{{\"t\":0.000000,\"op\":\"slot\",\"as\":{as_id},\"id\":{id},\"flags\":[{flags}],\"gpa\":\"{gpa}\",\"size\":\"{size}\",\"uaddr\":\"{uaddr}\"}}\n")
    }

    /// An `mmio` line: `dir` (`read`, `write`), `gpa`, `len`, `value`, `exit` (`user`,
    /// `kernel`).
    fn mmio_line(dir: &str, gpa: &str, len: u32, value: &str, exit: &str) -> String {
        format!("{{\"t\":0.000000,\"op\":\"mmio\",\"dir\":\"{dir}\",\"gpa\":\"{gpa}\",\"len\":{len},\"value\":\"{value}\",\"exit\":\"{exit}\"}}\n")
    }

    fn run(text: &str, cfg: ReplayConfig) -> RunReport {
        replay(&parse(text).expect("trace"), &cfg).expect("replay")
    }

    /// The configurations a recorded MMIO access must be MMIO under.
    fn every_mmu() -> [ReplayConfig; 3] {
        [
            ReplayConfig::new(FormatKind::Ept, true),
            ReplayConfig::new(FormatKind::Npt, false),
            ReplayConfig::shadow(true),
        ]
    }

    #[test]
    fn recorded_mmio_is_counted_by_exit_and_a_write_to_a_read_only_slot_is_an_emulated_write() {
        let text = [
            HEADER.to_string(),
            slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000"),
            slot_line(0, 1, "\"readonly\"", "0x100000", "0x10000", "0x7f0000100000"),
            mmio_line("read", "0xfee00030", 4, "0x14", "user"),
            mmio_line("write", "0xfee000b0", 4, "0x0", "kernel"),
            mmio_line("write", "0x100008", 4, "0x1", "user"),
        ]
        .concat();
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.mmio.first_misclassified);
            let m = &r.mmio;
            assert_eq!(
                (m.events, m.exit_user, m.exit_kernel, m.classified_mmio, m.readonly_writes),
                (3, 2, 1, 3, 1),
                "{}",
                cfg.name()
            );
            assert!(r.oracle.checked > 0, "{}: the replay's own accesses were checked", cfg.name());
            // No two slots share host memory: a probe reads through no alias (not even the
            // page it probed, which is no alias of itself).
            assert_eq!(r.own_accesses.alias_reads, 0, "{}", cfg.name());
            assert_eq!(r.events_applied, 5, "{}: every event applied or checked", cfg.name());
            // The run names its configuration and what it ran on.
            assert_eq!(r.config, cfg.name());
            assert_eq!(r.guest.is_some(), cfg.mmu == MmuKind::Shadow, "{}", cfg.name());
            assert_eq!(r.mmio_caching_effective, cfg.mmio_caching, "{}", cfg.name());
            assert!(!r.mmio_caching_reason.is_empty(), "{}", cfg.name());
            assert!(r.host_buffers > 0 && r.host_bytes >= 0x110000, "{}", cfg.name());
            // The MMIO latency histogram holds the accesses that ended as MMIO.
            let timeline = r.timeline.as_ref().expect("timeline");
            assert_eq!(timeline.mmio_latency.count, 3, "{}", cfg.name());
        }
    }

    /// Recorded MMIO all over the address space: each access in a GiB of its own takes two
    /// new TDP tables that its MMIO SPTE keeps (34000 accesses: 68000 tables, more than a fixed
    /// budget of 65536 gave, after which every access failed for want of memory and counted as
    /// misclassified). The table budget follows the trace's length; a host that still runs out
    /// fails the run with that reason, never as a misclassified access.
    #[test]
    fn mmio_in_many_regions_gets_its_page_tables() {
        let mut text =
            [HEADER.to_string(), slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000")].concat();
        const N: u64 = 34_000;
        for i in 1..=N {
            text.push_str(&mmio_line("read", &format!("{:#x}", i << 30), 4, "0x0", "user"));
        }
        let trace = parse(&text).expect("trace");
        let cfg = ReplayConfig::new(FormatKind::Ept, true);
        let r = replay(&trace, &cfg).expect("replay");
        assert!(r.passed(), "{:?}", r.mmio.first_misclassified);
        assert_eq!(r.mmio.classified_mmio, N);
        assert!(r.mmio_paths.mmio_sptes_created >= N, "each access left an MMIO SPTE");
    }

    /// With several vCPU threads, an access recorded right after the slot request that made
    /// its address RAM is another vCPU's, made while the request was in flight (hunt 43r L1:
    /// the kit stamps a request when the ioctl starts): counted as raced, not misclassified.
    /// One request later it is a misclassification again, and so is it in a trace of one vCPU
    /// thread, where the replay is exact.
    #[test]
    fn an_access_racing_the_latest_slot_request_of_another_vcpu_is_not_misclassified() {
        let summary = |threads: u32| {
            format!(
                "{{\"op\":\"summary\",\"span\":0.0,\"events\":{{\"slot\":2,\"mmio\":2,\
                 \"get-dirty-log\":0,\"clear-dirty-log\":0,\"kvm\":0}},\
                 \"kernel_mmio_dropped\":0,\"lost_events\":0,\"vcpu_threads\":{threads}}}\n"
            )
        };
        let trace = |threads: u32| {
            [
                HEADER.to_string(),
                slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000"),
                mmio_line("read", "0x1000", 4, "0x0", "user"),
                slot_line(0, 1, "", "0x200000", "0x100000", "0x7f0000200000"),
                mmio_line("write", "0x1000", 4, "0x1", "user"),
                summary(threads),
            ]
            .concat()
        };
        for cfg in every_mmu() {
            let r = run(&trace(2), cfg);
            assert_eq!((r.mmio.raced_slot_request, r.mmio.misclassified), (1, 1), "{}", cfg.name());
            assert_eq!((r.mmio.first_raced[0].line, r.mmio.first_misclassified[0].line), (3, 5));
            assert!(!r.passed(), "{}: the second access came one request later", cfg.name());
            let r = run(&trace(1), cfg);
            assert_eq!((r.mmio.raced_slot_request, r.mmio.misclassified), (0, 2), "{}", cfg.name());
        }
        let raced_only = trace(2).replace(&mmio_line("write", "0x1000", 4, "0x1", "user"), "");
        let raced_only = raced_only.replace("\"mmio\":2", "\"mmio\":1");
        for cfg in every_mmu() {
            let r = run(&raced_only, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.mmio.first_misclassified);
            assert_eq!(r.mmio.raced_slot_request, 1, "{}", cfg.name());
        }
    }

    /// Raced accesses are reported as misclassified ones are: all counted, the first 20 kept
    /// with their lines, and the text report lists them under the count. 21 reads recorded
    /// right after the request that made their page RAM, in a trace of two vCPU threads.
    #[test]
    fn raced_accesses_are_counted_and_the_first_20_kept() {
        let mut text =
            [HEADER.to_string(), slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000")].concat();
        for i in 0..21u64 {
            text.push_str(&mmio_line("read", &format!("{:#x}", 0x1000 + i * 8), 8, "0x0", "user"));
        }
        text.push_str(
            "{\"op\":\"summary\",\"span\":0.0,\"events\":{\"slot\":1,\"mmio\":21,\
             \"get-dirty-log\":0,\"clear-dirty-log\":0,\"kvm\":0},\
             \"kernel_mmio_dropped\":0,\"lost_events\":0,\"vcpu_threads\":2}\n",
        );
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.mmio.first_misclassified);
            assert_eq!(
                (r.mmio.raced_slot_request, r.mmio.misclassified),
                (21, 0),
                "{}",
                cfg.name()
            );
            let kept = &r.mmio.first_raced;
            assert_eq!(kept.len(), KEEP, "{}", cfg.name());
            assert_eq!((kept[0].line, kept[KEEP - 1].line), (3, 22), "{}", cfg.name());
            let report = super::super::report::TraceReport { runs: vec![r], ..Default::default() };
            let text = report.text();
            assert!(text.contains("    mmio: 21 more reached RAM inside the range"), "{text}");
            assert!(text.contains("      line 22: read 0x1098: RAM"), "{text}");
            assert!(!text.contains("      line 23: read"), "{text}");
        }
    }

    #[test]
    fn a_recorded_access_that_reaches_ram_is_misclassified_and_fails_the_run() {
        // 21 accesses into RAM: all counted, the first 20 kept, each with its line, direction
        // and what the MMU did (RAM; a recorded access is never performed, so no value).
        let mut text =
            [HEADER.to_string(), slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000")].concat();
        text.push_str(&mmio_line("write", "0x1000", 4, "0x1234", "user"));
        for i in 1..21u64 {
            text.push_str(&mmio_line("read", &format!("{:#x}", 0x1000 + i * 8), 8, "0x0", "user"));
        }
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            assert!(!r.passed(), "{}", cfg.name());
            assert_eq!((r.mmio.misclassified, r.mmio.classified_mmio), (21, 0), "{}", cfg.name());
            let kept = &r.mmio.first_misclassified;
            assert_eq!(kept.len(), KEEP, "{}", cfg.name());
            let first = Misclassified {
                line: 3,
                gpa: "0x1000".into(),
                dir: "write".into(),
                seen: "RAM 0x0".into(),
            };
            assert_eq!(kept[0], first, "{}", cfg.name());
            assert_eq!((kept[1].line, kept[1].dir.as_str()), (4, "read"), "{}", cfg.name());
            let report = super::super::report::TraceReport { runs: vec![r], ..Default::default() };
            assert!(
                report.text().contains("      line 3: write 0x1000: RAM 0x0"),
                "{}",
                report.text()
            );
        }
    }

    #[test]
    fn a_write_just_past_a_read_only_slot_is_no_write_to_that_slot() {
        // A read-only slot at [0x100000, 0x110000): a recorded write to its last word is an
        // emulated write to it, one to the first byte past its end is a write where no slot is.
        let text = [
            HEADER.to_string(),
            slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000"),
            slot_line(0, 1, "\"readonly\"", "0x100000", "0x10000", "0x7f0000200000"),
            mmio_line("write", "0x10fffc", 4, "0x1", "user"),
            mmio_line("write", "0x110000", 4, "0x1", "user"),
        ]
        .concat();
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.mmio.first_misclassified);
            let m = &r.mmio;
            assert_eq!((m.classified_mmio, m.readonly_writes), (2, 1), "{}", cfg.name());
        }
    }

    #[test]
    fn an_own_write_passes_only_if_both_the_access_and_the_buffer_are_right() {
        let (before, written) = (0x5eed_0000_0000_0001, 0x5eed_0000_0000_0002);
        let ram = Outcome::Ram(written);
        let err = Outcome::Error("livelock".into());
        // A read-only slot: MMIO, and the buffer untouched.
        assert!(own_write_ok(true, &Outcome::Mmio, before, before, written));
        assert!(!own_write_ok(true, &Outcome::Mmio, written, before, written), "MMIO that wrote");
        assert!(!own_write_ok(true, &ram, before, before, written), "RAM, another frame");
        assert!(!own_write_ok(true, &ram, written, before, written), "RAM, this frame");
        assert!(!own_write_ok(true, &err, before, before, written));
        // A writable slot: RAM, and the value in the buffer.
        assert!(own_write_ok(false, &ram, written, before, written));
        assert!(!own_write_ok(false, &ram, before, before, written), "RAM, another frame");
        assert!(!own_write_ok(false, &Outcome::Mmio, written, before, written), "MMIO that wrote");
        assert!(!own_write_ok(false, &Outcome::Mmio, before, before, written));
        assert!(!own_write_ok(false, &Outcome::Ram(before), written, before, written));
        assert!(!own_write_ok(false, &err, written, before, written));
    }

    #[test]
    fn the_pages_probed_in_a_range_are_its_first_middle_and_last() {
        let pages = |gpa, size| first_middle_last(gpa, size);
        assert_eq!(pages(0x100000, 0x3000), Some([0x100000, 0x101000, 0x102000]));
        assert_eq!(pages(0x100000, 0x5000), Some([0x100000, 0x102000, 0x104000]));
        assert_eq!(pages(0x7000, 0x1000), Some([0x7000; 3]));
        assert_eq!(pages(0x7000, 0x1fff), Some([0x7000; 3]), "whole pages only");
        assert_eq!(pages(0x7000, 0xfff), None, "no whole page");
        assert_eq!(pages(0x7000, 0), None, "empty");
        assert_eq!(pages(0x1800, 0x2000), None, "unaligned");
        assert_eq!(pages(0xffff_ffff_ffff_f000, 0x2000), None, "past 2^64");
    }

    #[test]
    fn the_replay_probes_the_old_and_the_requested_range_around_a_request_then_every_slot() {
        // A 3-page slot created at 0x100000, moved to 0x200000, deleted; an SMM slot created.
        let text = [
            HEADER.to_string(),
            slot_line(0, 1, "", "0x100000", "0x3000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x200000", "0x3000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x200000", "0x0", "0x7f0000000000"),
            slot_line(1, 0, "", "0x0", "0x1000", "0x7f0000100000"),
        ]
        .concat();
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.oracle.first_violations);
            // Create: before it, the three requested pages (holes); after it, those three again
            // (RAM now) and the slot's first, middle and last page.
            // Move: before it, the old range's first and last page (RAM) and the three requested
            // pages (holes); after it, those five again (RAM, RAM, RAM, hole, hole) and the slot.
            // Delete: before it, the old range's first and last page (RAM), after it, those two
            // (holes). The SMM slot: no probe (the vCPU is not in SMM).
            let o = &r.own_accesses;
            assert_eq!(
                (o.reads, o.writes, o.hole_reads, o.alias_reads),
                (6 + 2 + 3 + 3 + 2, 6 + 2 + 3 + 3 + 2, 3 + 3 + 2 + 2, 0),
                "{}",
                cfg.name()
            );
            // Each RAM probe checks a read and a write, each hole probe a read.
            assert_eq!(r.oracle.checked, 2 * o.reads + o.hole_reads, "{}", cfg.name());
        }
    }

    #[test]
    fn slot_requests_are_counted_by_kind_and_deletes_and_moves_by_their_zaps() {
        let zap = "{\"t\":0.000000,\"op\":\"kvm\",\"event\":\"zap_all_fast\"}\n";
        let text = [
            HEADER.to_string(),
            slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x200000", "0x10000", "0x7f0000200000"),
            // Line 4: dirty logging on (flags only), line 5: the same request again (no-op).
            slot_line(0, 1, "\"dirty_log\"", "0x200000", "0x10000", "0x7f0000200000"),
            slot_line(0, 1, "\"dirty_log\"", "0x200000", "0x10000", "0x7f0000200000"),
            // Line 6: a move, its annotation; line 8: a delete, its annotation.
            slot_line(0, 1, "\"dirty_log\"", "0x400000", "0x10000", "0x7f0000200000"),
            zap.to_string(),
            slot_line(0, 1, "", "0x400000", "0x0", "0x7f0000200000"),
            zap.to_string(),
            // Line 10: a delete the recording host did not zap for.
            slot_line(0, 0, "", "0x0", "0x0", "0x7f0000000000"),
        ]
        .concat();
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            let name = cfg.name();
            assert!(r.passed(), "{name}: {:?}", r.oracle.first_violations);
            let s = &r.slots;
            assert_eq!(
                (s.requests, s.applied, s.refused),
                (7, 7, 0),
                "{name}: {:?}",
                s.first_refusals
            );
            assert_eq!(
                (s.creates, s.flags_only, s.no_ops, s.moves, s.deletes),
                (2, 1, 1, 1, 2),
                "{name}"
            );
            assert_eq!(r.events_applied, 9, "{name}");
            let z = &r.zaps;
            assert_eq!(
                (z.deletes_and_moves, z.recorded_zap_all_fast, z.recorded_after_delete),
                (3, 2, 2),
                "{name}: {z:?}"
            );
            if cfg.mmu == MmuKind::Shadow {
                // Each delete and move zaps all, as on the recording host: every request but
                // the last matches its annotations (as does the stretch before the first).
                assert_eq!((z.zap_all_fast, z.zap_range), (3, 0), "{name}: {z:?}");
                assert!(z.per_request, "{name}");
                assert_eq!((z.requests_matching, z.requests_differing), (7, 1), "{name}: {z:?}");
                let diff = ZapDiff { line: 10, recorded: 0, ours: 1 };
                assert_eq!(z.first_differing, [diff], "{name}");
            } else {
                // A TDP MMU zaps the slot's range.
                assert_eq!((z.zap_all_fast, z.zap_range), (0, 3), "{name}: {z:?}");
                assert!(!z.per_request, "{name}");
                assert_eq!((z.requests_matching, z.requests_differing), (0, 0), "{name}: {z:?}");
            }
        }
    }

    #[test]
    fn the_shadow_pages_a_delete_zaps_are_counted_per_delete() {
        // The same create and delete, once and twice: the second delete zaps what the first
        // did (each starts from a slot the probes just mapped), so twice the count, not more.
        let cycle = [
            slot_line(0, 1, "", "0x100000", "0x10000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x100000", "0x0", "0x7f0000000000"),
        ]
        .concat();
        let once = run(&format!("{HEADER}{cycle}"), ReplayConfig::shadow(true)).zaps;
        let twice = run(&format!("{HEADER}{cycle}{cycle}"), ReplayConfig::shadow(true)).zaps;
        assert!(once.table_pages_zapped > 0, "{once:?}");
        assert_eq!(twice.table_pages_zapped, 2 * once.table_pages_zapped, "{once:?} {twice:?}");
    }

    #[test]
    fn every_request_whose_zaps_differ_is_counted_and_the_first_are_kept_with_their_line() {
        // 21 deletes that zap all under shadow, none annotated: 21 differ, the first 20 kept.
        let mut text = HEADER.to_string();
        for _ in 0..21 {
            text.push_str(&slot_line(0, 1, "", "0x100000", "0x10000", "0x7f0000000000"));
            text.push_str(&slot_line(0, 1, "", "0x100000", "0x0", "0x7f0000000000"));
        }
        let z = run(&text, ReplayConfig::shadow(false)).zaps;
        // The stretch before the first request and the 21 creates match.
        assert_eq!((z.requests_matching, z.requests_differing), (22, 21), "{z:?}");
        assert_eq!(z.first_differing.len(), KEEP);
        let diff = |line| ZapDiff { line, recorded: 0, ours: 1 };
        assert_eq!(
            (z.first_differing[0].clone(), z.first_differing[19].clone()),
            (diff(3), diff(41))
        );
    }

    #[test]
    fn a_configuration_is_named_by_its_mmu_and_mmio_caching() {
        let sev = FormatKind::NptSev { c_bit: 47 };
        let names = [
            ReplayConfig::new(FormatKind::Ept, true),
            ReplayConfig::new(FormatKind::Npt, false),
            ReplayConfig::new(sev, true),
            ReplayConfig::shadow(false),
        ]
        .map(|c| c.name());
        assert_eq!(names, ["ept-on", "npt-off", "npt-sev-on", "shadow-off"]);
        let shadow = ReplayConfig::shadow(true);
        assert_eq!(
            (shadow.mmu, shadow.format, shadow.phys_bits),
            (MmuKind::Shadow, FormatKind::Npt, 46)
        );
    }

    #[test]
    fn a_shadow_replay_reaching_the_byte_at_4_gib_runs_its_guest_in_long_mode() {
        // The highest byte named is 2^32 itself: a guest without paging cannot form it.
        let text = [
            HEADER.to_string(),
            slot_line(0, 0, "", "0x0", "0x100000", "0x7f0000000000"),
            mmio_line("read", "0x100000000", 1, "0x0", "user"),
        ]
        .concat();
        let r = run(&text, ReplayConfig::shadow(true));
        assert!(r.passed(), "{:?} {:?}", r.oracle.first_violations, r.mmio.first_misclassified);
        let guest = r.guest.unwrap_or_default();
        assert!(guest.starts_with("long mode"), "{guest}");
    }

    #[test]
    fn the_timeline_samples_the_recorded_clock_at_intervals_of_a_500th_of_the_trace() {
        // 10 s of trace: a 20 ms interval. Samples after the events at 30 ms (the first past
        // 20 ms; the next one due at 40 ms), 45 ms (the next at 60 ms, so none at 55 ms) and
        // 10 s, and the last one at the end.
        let at = |t: &str, line: String| line.replacen("0.000000", t, 1);
        let lapic = || mmio_line("read", "0xfee00030", 4, "0x14", "kernel");
        let text = [
            HEADER.to_string(),
            slot_line(0, 0, "", "0x0", "0x10000", "0x7f0000000000"),
            at("0.030000", lapic()),
            at("0.045000", lapic()),
            at("0.055000", lapic()),
            at("10.000000", lapic()),
        ]
        .concat();
        let r = run(&text, ReplayConfig::new(FormatKind::Ept, true));
        assert!(r.passed());
        let timeline = r.timeline.as_ref().expect("timeline");
        assert_eq!(timeline.interval_us, 20_000);
        let t: Vec<u64> = timeline.samples.iter().map(|s| s.t_us).collect();
        assert_eq!(t, [0, 30_000, 45_000, 10_000_000, 10_000_000]);
        // The samples count every access the vCPU made, the replay's own and the recorded
        // ones, and the applied slot requests.
        let o = &r.own_accesses;
        let all = o.reads + o.writes + o.alias_reads + o.hole_reads + r.mmio.events;
        let last = timeline.samples.last().expect("a sample");
        assert_eq!((last.accesses, last.updates), (all, 1));
        let first = &timeline.samples[1];
        assert_eq!((first.accesses, first.updates), (all - 3, 1));
    }

    #[cfg(feature = "historical-bugs")]
    #[test]
    fn a_stale_translation_after_a_delete_is_a_violation_naming_the_vcpu_address_and_outcomes() {
        // Without the TLB flush on a zap, the deleted range still reads as RAM.
        let text = [
            HEADER.to_string(),
            slot_line(0, 1, "", "0x100000", "0x10000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x100000", "0x0", "0x7f0000000000"),
        ]
        .concat();
        let bugs = BugSet::only(vmmu::bugs::Bug::NoTlbFlushOnZap);
        let r = run(&text, ReplayConfig { bugs, ..ReplayConfig::new(FormatKind::Ept, true) });
        assert!(!r.passed());
        let v = &r.oracle.first_violations[0];
        assert_eq!(v.vcpu, Some(0), "{v:?}");
        let hex = v.gpa.as_deref().and_then(|g| g.strip_prefix("0x"));
        let gpa = hex.and_then(|g| u64::from_str_radix(g, 16).ok());
        assert!(gpa.is_some_and(|g| (0x100000..0x110000).contains(&g)), "{v:?}");
        assert_eq!((v.what.as_str(), v.expected.as_str()), ("read where no slot is", "MMIO"));
        assert!(v.seen.starts_with("RAM "), "{v:?}");
    }

    #[test]
    fn probe_tokens_are_new_and_unlike_small_values_and_their_word_goes_round_the_page() {
        let mut tokens = Tokens::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut words = std::collections::BTreeSet::new();
        for _ in 0..1024 {
            let offset = tokens.word_offset();
            assert!(offset % 8 == 0 && offset < PAGE_SIZE, "{offset:#x}");
            words.insert(offset);
            let t = tokens.next();
            assert_eq!(t >> 48, 0x5eed, "{t:#x}");
            assert!(seen.insert(t), "{t:#x} handed out twice");
        }
        assert_eq!(words.len(), 512, "every word of a page");
        assert_eq!((tokens.word_offset(), tokens.next()), (0, 0x5eed_0000_0000_0401));
    }

    #[test]
    fn a_run_says_whether_its_host_memory_got_frames_up_front_or_page_by_page() {
        // 64 GiB of RAM on a 36-bit host (64 GiB of frames, some kept for tables): on demand.
        let text =
            [HEADER.to_string(), slot_line(0, 0, "", "0x0", "0x1000000000", "0x7f0000000000")]
                .concat();
        let cfg = ReplayConfig { phys_bits: 36, ..ReplayConfig::new(FormatKind::Ept, true) };
        let r = run(&text, cfg);
        assert!(r.passed(), "{:?} {:?}", r.slots.first_refusals, r.oracle.first_violations);
        assert!(r.host_frames_on_demand);
        let r = run(&text, ReplayConfig { phys_bits: 37, ..cfg });
        assert!(r.passed() && !r.host_frames_on_demand);
    }

    #[test]
    fn the_replays_own_accesses_read_every_alias_of_the_page_they_wrote() {
        // Two slots on the same host range: every probe of one reads the word back through
        // the other, and the report counts those reads.
        let text = [
            HEADER.to_string(),
            slot_line(0, 0, "", "0x0", "0x10000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x100000", "0x10000", "0x7f0000000000"),
        ]
        .concat();
        for cfg in every_mmu() {
            let r = run(&text, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.oracle.first_violations);
            let o = &r.own_accesses;
            assert!(o.alias_reads > 0 && o.alias_reads <= o.reads, "{}: {o:?}", cfg.name());
        }
    }

    #[test]
    fn a_trace_with_a_thousand_slots_is_probed_in_rounds_not_all_after_every_request() {
        // 1000 one-page slots, then a delete and a re-create of the first. Probing every live
        // slot after every request made 3 * (1 + 2 + ... + 1000) = 1.5 M probes (and each
        // scanned every slot to find its own: cubic); in rounds of PROBE_ALL_MAX_SLOTS, at most
        // that many slots' 3 pages per request, and still each slot in turn.
        let n = 1000u16;
        let mut text = HEADER.to_string();
        let line = |id: u16, size: &str| {
            let gpa = format!("{:#x}", 0x100000 + u64::from(id) * 0x2000);
            let uaddr = format!("{:#x}", 0x7f00_0000_0000u64 + u64::from(id) * 0x1000);
            slot_line(0, id, "", &gpa, size, &uaddr)
        };
        for id in 0..n {
            text.push_str(&line(id, "0x1000"));
        }
        text.push_str(&line(0, "0x0"));
        text.push_str(&line(0, "0x1000"));
        let r = run(&text, ReplayConfig::new(FormatKind::Ept, true));
        assert!(r.passed(), "{:?}", r.oracle.first_violations);
        let requests = u64::from(n) + 2;
        let per_request = 3 * PROBE_ALL_MAX_SLOTS as u64 + 5; // a round and the warm pages
        let o = &r.own_accesses;
        assert!(o.reads <= requests * per_request, "{o:?}");
        assert!(o.reads >= 3 * u64::from(n), "every slot probed at least once: {o:?}");
    }

    #[test]
    fn a_page_with_hundreds_of_aliases_is_read_back_through_some_of_them_per_probe() {
        // 300 slots over one host page: each probe reads back through ALIAS_READS_MAX of them.
        let mut text = HEADER.to_string();
        for id in 0..300u16 {
            let gpa = format!("{:#x}", 0x100000 + u64::from(id) * 0x2000);
            text.push_str(&slot_line(0, id, "", &gpa, "0x1000", "0x7f0000000000"));
        }
        let r = run(&text, ReplayConfig::new(FormatKind::Ept, true));
        assert!(r.passed(), "{:?}", r.oracle.first_violations);
        let o = &r.own_accesses;
        assert!(o.alias_reads > 0 && o.alias_reads <= o.reads * ALIAS_READS_MAX as u64, "{o:?}");
    }

    #[test]
    fn every_refused_slot_request_is_counted_and_the_first_are_kept_with_their_line() {
        // 21 slots above a 46-bit host's MAXPHYADDR: each refused (EINVAL), the first 20 kept.
        let mut text = HEADER.to_string();
        for id in 0..21u16 {
            let gpa = format!("{:#x}", 0x7ff0_0000_0000u64 + u64::from(id) * 0x1_0000);
            text.push_str(&slot_line(0, id, "", &gpa, "0x1000", "0x7f0000000000"));
        }
        let r = run(&text, ReplayConfig::new(FormatKind::Ept, true));
        assert!(!r.passed());
        assert_eq!((r.slots.requests, r.slots.applied, r.slots.refused), (21, 0, 21));
        assert_eq!(r.slots.first_refusals.len(), KEEP);
        let f = &r.slots.first_refusals[0];
        assert_eq!((f.line, f.slot.as_str(), f.errno.as_str()), (2, "0/0", "EINVAL"));
        assert_eq!(r.slots.first_refusals[19].slot, "0/19");
    }

    #[test]
    fn dirty_log_calls_are_applied_and_a_refused_one_fails_the_run() {
        let get = |as_id: u16, id: u16| {
            format!("{{\"t\":0.000000,\"op\":\"get-dirty-log\",\"as\":{as_id},\"id\":{id}}}\n")
        };
        let clear = |first: u64, n: u64| {
            format!("{{\"t\":0.000000,\"op\":\"clear-dirty-log\",\"as\":0,\"id\":0,\"first_page\":{first},\"num_pages\":{n}}}\n")
        };
        let ok = [
            HEADER.to_string(),
            slot_line(0, 0, "\"dirty_log\"", "0x0", "0x100000", "0x7f0000000000"),
            slot_line(0, 1, "", "0x200000", "0x10000", "0x7f0000200000"),
            // The SMM twin of slot 0 has no dirty log: a GET there is no GET on slot 0.
            slot_line(1, 0, "", "0x0", "0x100000", "0x7f0000000000"),
            get(0, 0),
            clear(0, 64),
        ]
        .concat();
        for cfg in every_mmu() {
            let r = run(&ok, cfg);
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.dirty_log.first_refusals);
            assert_eq!(r.events_applied, 5, "{}: every event applied", cfg.name());
            let d = &r.dirty_log;
            assert_eq!(
                (d.get, d.clear, d.on_logged_slot, d.refused),
                (1, 1, 2, 0),
                "{}",
                cfg.name()
            );
            assert!(d.pages > 0, "{}: the replay's own writes dirtied slot 0", cfg.name());
        }
        // A GET on a slot without dirty_log, one in SMM without it, a CLEAR of a misaligned
        // range, then 18 GETs on a slot that does not exist: 21 refusals, the first 20 kept.
        let mut bad = [ok.clone(), get(0, 1), get(1, 0), clear(1, 64)].concat();
        for _ in 0..18 {
            bad.push_str(&get(0, 9));
        }
        for cfg in every_mmu() {
            let r = run(&bad, cfg);
            assert!(!r.passed(), "{}", cfg.name());
            let d = &r.dirty_log;
            assert_eq!((d.get, d.clear, d.refused), (21, 2, 21), "{}", cfg.name());
            assert_eq!(d.first_refusals.len(), KEEP, "{}", cfg.name());
            assert!(
                d.first_refusals[0].starts_with("line 7: get-dirty-log as 0 id 1: "),
                "{:?}",
                d.first_refusals
            );
            assert!(
                d.first_refusals[1].starts_with("line 8: get-dirty-log as 1 id 0: "),
                "{:?}",
                d.first_refusals
            );
            assert!(
                d.first_refusals[2].starts_with("line 9: clear-dirty-log as 0 id 0: EINVAL"),
                "{:?}",
                d.first_refusals
            );
        }
    }

    #[test]
    fn phys_bits_cover_the_highest_slot_or_access() {
        assert_eq!(bits(&[]), DEFAULT_PHYS_BITS);
        assert_eq!(bits(&[slot("0x0", "0x10000000"), mmio("0xfee00000")]), 46);
        assert_eq!(bits(&[slot("0x3fff00000000", "0x100000000")]), 46, "ends at 2^46 - 1");
        // A 64-bit BAR placed by firmware near the top of a 48-bit host's space.
        assert_eq!(bits(&[slot("0x7ff000000000", "0x4000")]), 47);
        assert_eq!(bits(&[mmio("0x800000000000")]), 48);
        assert_eq!(bits(&[mmio("0x7ffffffffff8")]), 47, "8 bytes ending at 2^47 - 1");
        assert_eq!(bits(&[slot("0xfffffffff000", "0x1000")]), 48);
        assert_eq!(bits(&[slot("0xffffffffff000", "0x1000")]), 52, "the last page below 2^52");
        // Requests no host accepts say nothing about the recording host's width: past 2^52, or
        // of more pages than a slot may have.
        assert_eq!(bits(&[slot("0xffff000000000000", "0x1000")]), 46);
        assert_eq!(bits(&[slot("0x800000000000", "0x100000000000")]), 46, "2^32 pages");
    }

    #[test]
    fn a_trace_ending_at_the_largest_t_replays_and_renders() {
        // `t` is any six-decimal number of seconds that fits 64 bits of microseconds.
        let late = mmio("0xfee00000").replace("0.000000", "18446744073709.551615");
        let text = format!("{HEADER}{}{late}", slot("0x0", "0x10000"));
        let trace = parse(&text).expect("trace");
        let r = replay(&trace, &ReplayConfig::new(FormatKind::Ept, true)).expect("replay");
        assert!(r.passed());
        let timeline = r.timeline.as_ref().expect("timeline");
        assert_eq!(timeline.samples.last().map(|s| s.t_us), Some(u64::MAX));
        assert!(!timeline.rates().is_empty());
    }

    #[test]
    fn a_slot_above_2_pow_48_is_its_own_memory_not_an_alias_of_low_ram() {
        // RAM at 0 and a 64-bit BAR at 0xf000000000000 (a 52-bit host): with a 4-level root the
        // BAR's pages aliased low RAM (the walk drops bits 48 and up), so the replay's own
        // probes read the wrong memory and the hole above the BAR read as RAM.
        let ram = "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n";
        let bar = "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":1,\"flags\":[],\"gpa\":\"0xf000000000000\",\"size\":\"0x4000\",\"uaddr\":\"0x7f5000000000\"}\n";
        let text = format!("{HEADER}{ram}{bar}{}", mmio("0xf000000004000"));
        let trace = parse(&text).expect("trace");
        assert_eq!(phys_bits_for(&trace), 52);
        let configs = [
            ReplayConfig::new(FormatKind::Ept, true),
            ReplayConfig::new(FormatKind::Npt, true),
            // The shadow MMU's guest identity-maps the BAR's GiB too (4-level guest tables reach
            // 2^48 only, so the guest's maxphyaddr and walk must cover bits 48 and up).
            ReplayConfig::shadow(true),
        ];
        for cfg in configs {
            let cfg = ReplayConfig { phys_bits: 52, ..cfg };
            let r = replay(&trace, &cfg).expect("replay");
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.oracle.first_violations);
            assert_eq!(r.mmio.classified_mmio, 1);
        }
    }

    #[test]
    fn a_shadow_replay_with_every_gib_touched_puts_its_tables_in_a_gap_and_passes() {
        // A 2 MiB slot (aliases of one buffer) at the start of each GiB of a 36-bit host: the
        // TDP replays passed, the shadow ones could not run (no free GiB for the guest tables).
        let slots: String = (0..64u64)
            .map(|i| {
                slot(&format!("{:#x}", i << 30), "0x200000")
                    .replace("\"id\":1", &format!("\"id\":{i}"))
            })
            .collect();
        let trace = parse(&format!("{HEADER}{slots}{}", mmio("0x40200000"))).expect("trace");
        for cfg in [ReplayConfig::new(FormatKind::Ept, true), ReplayConfig::shadow(true)] {
            let cfg = ReplayConfig { phys_bits: 36, ..cfg };
            let r = replay(&trace, &cfg).expect("replay");
            assert!(r.passed(), "{}: {:?}", cfg.name(), r.oracle.first_violations);
            assert_eq!(r.slots.applied, 64);
        }
    }

    #[test]
    fn the_shadow_guest_reaches_a_slot_and_an_access_above_the_hosts_maxphyaddr() {
        // --phys-bits 36 and a slot crossing 2^36: TDP refuses it (EINVAL), the shadow MMU
        // accepts it (2^52, facts §5.3) but its guest, with MAXPHYADDR 36 and nothing mapped
        // above, page-faulted on the replay's probes (15 violations) and on an MMIO access there.
        let ram = "{\"t\":0.000000,\"op\":\"slot\",\"as\":0,\"id\":0,\"flags\":[],\"gpa\":\"0x0\",\"size\":\"0x100000\",\"uaddr\":\"0x7f0000000000\"}\n";
        let text =
            format!("{HEADER}{ram}{}{}", slot("0xff0000000", "0x20000000"), mmio("0x1010000000"));
        let trace = parse(&text).expect("trace");
        let r = replay(&trace, &ReplayConfig { phys_bits: 36, ..ReplayConfig::shadow(true) })
            .expect("replay");
        assert!(r.passed(), "{:?} {:?}", r.oracle.first_violations, r.mmio.first_misclassified);
        assert_eq!(r.slots.applied, 2);
        assert_eq!(r.mmio.classified_mmio, 1);
        let tdp = ReplayConfig { phys_bits: 36, ..ReplayConfig::new(FormatKind::Ept, true) };
        let r = replay(&trace, &tdp).expect("replay");
        assert_eq!(r.slots.refused, 1, "TDP maps up to the host's MAXPHYADDR only");
    }

    #[test]
    fn a_recorded_access_at_2_pow_52_is_no_shadow_ram_alias_of_low_memory() {
        // No x86 guest reaches 2^52; the shadow replay's guest once used it as a guest-virtual
        // address, which the 4-level walk cut to 0: the access read as RAM of the slot at 0.
        // Such a trace is malformed now (the TDP replays had called the access MMIO); the
        // shadow replay still refuses to map anything there.
        let text = format!("{HEADER}{}{}", slot("0x0", "0x100000"), mmio("0x10000000000000"));
        let e = parse(&text).expect_err("an access no x86 guest can make");
        assert!(e.to_string().contains("no x86 guest can access"), "{e}");
    }

    #[test]
    fn a_recorded_access_above_the_tdp_tables_reach_is_no_ram_alias_of_low_memory() {
        // A 52-bit guest's read at 2^48 + 0x100, replayed with --phys-bits 36: the 4-level walk
        // cut it to 0x100 and the access read as the RAM of the slot at 0 ("RAM 0x0").
        let text = format!("{HEADER}{}{}", slot("0x0", "0x100000"), mmio("0x1000000000100"));
        let trace = parse(&text).expect("trace");
        for format in [FormatKind::Ept, FormatKind::Npt] {
            let cfg = ReplayConfig { phys_bits: 36, ..ReplayConfig::new(format, true) };
            let r = replay(&trace, &cfg).expect("replay");
            assert_eq!(r.mmio.misclassified, 1, "{}", cfg.name());
            let seen = &r.mmio.first_misclassified[0].seen;
            assert!(seen.contains("map nothing") && seen.contains("48 bits"), "{seen}");
            // With the bits it needs, 5 levels: MMIO.
            let cfg = ReplayConfig { phys_bits: 52, ..cfg };
            let r = replay(&trace, &cfg).expect("replay");
            assert_eq!((r.mmio.classified_mmio, r.mmio.misclassified), (1, 0), "{}", cfg.name());
        }
    }

    #[test]
    fn the_shadow_hardware_refuses_an_address_the_guest_mode_cannot_form() {
        // Without paging the guest forms 32-bit addresses only; an access at 4 GiB ended as
        // MMIO at 0x100000010 instead of #GP (in long mode, the non-canonical 2^52 read the RAM
        // at 0: the 4-level walk ignores bits 63:48).
        let text = format!("{HEADER}{}", slot("0x0", "0x100000"));
        let trace = parse(&text).expect("trace");
        let cfg = ReplayConfig::shadow(true);
        let memory = TraceMemory::new(&trace, cfg.phys_bits).expect("memory");
        let mmu_cfg = RealMmuConfig {
            format: FormatKind::Npt,
            phys_bits: cfg.phys_bits,
            mmio_caching: true,
            vcpus: 1,
            generation_base: 0,
            slot_zap_all: true,
            bugs: BugSet::NONE,
            tdp_prefetch: false,
            shadow_mmio_path_only: false,
            shadow_pages: None,
        };
        let mmu = RealMmu::shadow(memory.host().clone(), mmu_cfg, 1).expect("mmu");
        let mut hw = HwVcpu::with_state(&mmu, memory.host(), mmu.create_vcpu(0), 64);
        let (tables, _) = shadow_guest(&trace, &memory, &mmu, &mut hw, &cfg).expect("guest");
        assert!(tables.is_none(), "no paging below 4 GiB");
        let region = UserspaceMemoryRegion {
            slot: 1,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0x100000,
            userspace_addr: memory.hva(0x7f0000000000).expect("hva"),
        };
        mmu.vm().set_memory_region(&region).expect("slot");
        let mut tlb = GvaTlb::default();
        for (gva, ram) in [(0x10, true), (NONPAGING_LIMIT + 0x10, false)] {
            hw.enter_guest();
            let r = shadow_access(
                &mut hw,
                memory.host(),
                &mut tlb,
                gva,
                Width::W8,
                RamOp::Load,
                || true,
            );
            hw.exit_guest();
            match r {
                ShadowAccess::Ram { .. } => assert!(ram, "{gva:#x} read as RAM"),
                ShadowAccess::Error(e) => assert!(!ram && e.contains("#GP"), "{gva:#x}: {e}"),
                ShadowAccess::Mmio(g) => panic!("{gva:#x}: MMIO at {g}"),
                ShadowAccess::PageFault(e) => panic!("{gva:#x}: page fault {e:#x}"),
            }
        }
    }

    #[test]
    fn a_trace_from_a_48_bit_host_replays_with_its_phys_bits_and_is_refused_with_46() {
        let text =
            format!("{HEADER}{}{}", slot("0x7ff000000000", "0x4000"), mmio("0x7ff000004000"));
        let trace = parse(&text).expect("trace");
        let cfg =
            |phys_bits| ReplayConfig { phys_bits, ..ReplayConfig::new(FormatKind::Ept, true) };
        let r = replay(&trace, &cfg(phys_bits_for(&trace))).expect("replay");
        assert!(r.passed(), "{}", r.slots.refused);
        assert_eq!(r.phys_bits, 47);
        let r = replay(&trace, &cfg(DEFAULT_PHYS_BITS)).expect("replay");
        assert_eq!(r.slots.refused, 1, "KVM with MAXPHYADDR 46 refuses the slot (EINVAL)");
    }

    /// A slot request no host accepts by its shape (it reaches past 2^63), and one this run's
    /// MAXPHYADDR refuses (at 2^50 under EPT with 46 bits): both are refused, and the replay's
    /// own accesses before them skip the pages no guest can form, instead of reporting the
    /// MMU's "maps nothing there" as a violation (found by a code-quality audit).
    #[test]
    fn a_refused_request_beyond_what_a_guest_forms_is_no_violation() {
        let huge =
            format!("{HEADER}{}", slot_line(0, 1, "", "0x0", "0xfffffffffffff000", "0x1000"));
        for cfg in every_mmu() {
            let r = run(&huge, cfg);
            assert_eq!(r.slots.refused, 1, "{}", cfg.name());
            assert_eq!(r.oracle.violations, 0, "{}: {:?}", cfg.name(), r.oracle);
        }
        let high = format!(
            "{HEADER}{}",
            slot_line(0, 1, "", "0x4000000000000", "0x1000", "0x7f0000000000")
        );
        let cfg = ReplayConfig { phys_bits: 46, ..ReplayConfig::new(FormatKind::Ept, true) };
        let r = run(&high, cfg);
        assert_eq!(r.slots.refused, 1);
        assert_eq!(r.oracle.violations, 0, "{:?}", r.oracle);
    }
}
