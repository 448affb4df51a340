//! The oracle: judges every guest access against what the memslot history allows.
//!
//! Model. Memslot updates are serial (one device manager) and each is one transition from map
//! version `k-1` to `k`, stamped on a global logical [`Clock`] that ticks at the update's start
//! (to `2k-1`) and at its end (to `2k`). An access reads the clock when it starts and when it ends;
//! version `k` may be observed by the access iff the access's interval meets `[start of update k,
//! end of update k+1]`, which with these stamps gives the window
//! `floor(start/2) ..= ceil(end/2)` ([`Clock::window`]): an access in flight across an update may
//! see either side, one that starts after an update returned must see it.
//!
//! What is checked, and how (all inline in the vCPU's own [`VcpuChecker`], so the oracle adds no
//! shared lock or shared write to the access path; results are merged after the run):
//! - provenance: every RAM access is judged by where the data came from, not only by its value:
//!   the machine reports the host address it actually touched (the frame the translation named,
//!   plus the page offset), and it must be the host address the allowed map gives for the GPA,
//!   so a read through a stale or wrong translation is a violation even when the value it read
//!   happens to match (narrow reads of patterns, zero pages, equal values in two buffers);
//! - private RAM: the vCPU keeps a byte shadow of its area; every read must match it exactly;
//! - shared RAM: reads of own words match the vCPU's shadow; reads of other words must hold the
//!   initial pattern or a value that word's owner writes ([`shared_value`] for that word);
//! - ROM: reads see the ROM pattern; writes are MMIO exits, never RAM;
//! - device window: always the device (never RAM, never an exit), with the expected register
//!   values;
//! - BAR and DIMM: the outcome (MMIO exit, or RAM and its value) must be what some version in the
//!   access's window maps at the address; reads compare the value with the pattern the mapped
//!   buffer holds there (guest-visible; any value in a BAR scratch page, which vCPUs write);
//! - host invalidations (`--stress-paths`): while the host invalidates a range (between the MMU
//!   notifier's begin returning and its end being called) the device manager overwrites the
//!   range with [`POISON`] and restores it before the end; no guest access may happen in between
//!   (faults there must retry until the end, and the pages are re-faulted after it), so a read
//!   of poison, or a write lost under the restore, is a violation of the checks above;
//! - at the end ([`Oracle::final_checks`]): ROM, BAR and DIMM still hold their patterns (outside
//!   the BAR scratch pages), every private area equals its vCPU's shadow.
//!
//! Ordering argument for the stamps: the device manager ticks with `SeqCst` read-modify-writes;
//! vCPUs read with `SeqCst` loads. An access's start load precedes its TLB lookup or walk in
//! program order, and an update's end tick follows its flush wait, so an access whose start load
//! sees the end tick also sees the flushed TLB and the new map (the MMU publishes the map with
//! release/acquire; the machine's walker must load SPTEs with at least `Acquire`). An access's end
//! load follows its map read, which is ordered after the updater's start tick through the map's
//! own release/acquire chain, so an access that saw a new version also sees its start tick.

use crate::bus::RegisterDevice;
use crate::host::HostBuffer;
use crate::layout::{
    pattern_word, shared_value, tag_of, MachineMemory, PRIVATE_PER_VCPU, SHARED_USED,
};
use crate::mix::{GuestAccess, MixKind};
use crate::ram::Width;
use crate::schedule::Schedule;
use core::sync::atomic::{AtomicU64, Ordering};
use serde::Serialize;
use std::sync::Arc;
use vmmu::types::{Gpa, Hva};

/// What the device manager writes into host pages while the host invalidates them (one 8-byte
/// word, repeated): never a pattern (top byte 0xa5) nor a shared value (0x5a).
pub const POISON: u64 = 0xdead_f00d_dead_f00d;

/// How many violations are kept in full (all are counted).
pub const KEEP_VIOLATIONS: usize = 20;

/// The global logical clock of memslot updates. Only the device manager ticks it.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// A clock at 0 (no update started).
    pub fn new() -> Clock {
        Clock(AtomicU64::new(0))
    }
    /// The current stamp. Lock-free, one shared load.
    #[inline]
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    /// Ticks once (at an update's start or end) and returns the new stamp.
    #[inline]
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    /// The map versions an access stamped `[start, end]` may observe.
    #[inline]
    pub const fn window(start: u64, end: u64) -> (u64, u64) {
        (start / 2, end.div_ceil(2))
    }
}

/// What an access did, as the machine saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// It went to RAM at host address `hva`; `value` is what a load read (or what a store wrote).
    Ram {
        /// The host address accessed.
        hva: Hva,
        /// The value read or written.
        value: u64,
    },
    /// It went to the MMIO bus; `device` says whether a device took it (else: exit to
    /// userspace). `value` is what a load received.
    Mmio {
        /// A device handled it.
        device: bool,
        /// The value a load received.
        value: u64,
    },
    /// The MMU failed the access.
    Error(String),
    /// A guest page fault with this error code (guest paging): the guest's own tables refused
    /// the access.
    GuestPageFault {
        /// The architectural #PF error code.
        error: u64,
    },
}

/// One wrong outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The vCPU, or `None` for the device manager and end-of-run checks.
    pub vcpu: Option<usize>,
    /// The guest address, if an access.
    pub gpa: Option<String>,
    /// What was being done.
    pub what: String,
    /// What was allowed.
    pub expected: String,
    /// What happened.
    pub seen: String,
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.vcpu {
            Some(v) => write!(f, "vCPU {v}")?,
            None => write!(f, "machine")?,
        }
        if let Some(g) = &self.gpa {
            write!(f, " gpa {g}")?;
        }
        write!(f, " {}: expected {}, saw {}", self.what, self.expected, self.seen)
    }
}

/// The oracle's verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OracleReport {
    /// Wrong outcomes, counted.
    pub violations: u64,
    /// Outcomes judged (accesses, memslot results, end checks).
    pub checked: u64,
    /// The first few violations in full.
    pub first_violations: Vec<Violation>,
}

impl OracleReport {
    /// Adds a violation (kept in full while there is room).
    pub fn push(&mut self, v: Violation) {
        self.violations += 1;
        if self.first_violations.len() < KEEP_VIOLATIONS {
            self.first_violations.push(v);
        }
    }
    /// Merges `o` into `self`.
    pub fn merge(&mut self, o: OracleReport) {
        self.checked += o.checked;
        self.violations += o.violations;
        for v in o.first_violations {
            if self.first_violations.len() < KEEP_VIOLATIONS {
                self.first_violations.push(v);
            }
        }
    }
}

/// A buffer's place in host memory, for computing expected values without locks.
#[derive(Clone, Debug)]
struct BufferInfo {
    start: u64,
    len: u64,
    tag: u64,
    name: String,
    /// Offset from which vCPUs may write (a BAR's scratch page; `len` elsewhere).
    scratch: u64,
}

/// What the oracle knows: the layout, the schedule, the buffers. Shared, immutable.
#[derive(Debug)]
pub struct Oracle {
    memory: MachineMemory,
    schedule: Arc<Schedule>,
    buffers: Vec<BufferInfo>,
    shared_tag: u64,
    rom_tag: u64,
}

/// What a version maps at an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapped {
    Mmio,
    Ram { hva: u64, readonly: bool },
}

impl Oracle {
    /// An oracle for `memory` under `schedule`.
    pub fn new(memory: MachineMemory, schedule: Arc<Schedule>) -> Oracle {
        let bar = &memory.layout().bar;
        let mut buffers: Vec<BufferInfo> = memory
            .buffers()
            .iter()
            .map(|b| BufferInfo {
                start: b.hva().0,
                len: b.len(),
                tag: tag_of(b),
                name: b.name().to_string(),
                scratch: if bar.buffers.contains(&b.name()) {
                    bar.scratch_offset()
                } else {
                    b.len()
                },
            })
            .collect();
        buffers.sort_by_key(|b| b.start);
        let l = memory.layout();
        let tag = |name: &str| memory.buffer(name).map_or(0, |b| tag_of(b));
        let (shared_tag, rom_tag) = (tag(l.shared.name), tag(l.rom.name));
        Oracle { memory, schedule, buffers, shared_tag, rom_tag }
    }

    /// The schedule the oracle judges against.
    pub fn schedule(&self) -> &Arc<Schedule> {
        &self.schedule
    }

    fn buffer_at(&self, hva: u64) -> Option<&BufferInfo> {
        let i = self.buffers.partition_point(|b| b.start <= hva);
        self.buffers.get(i.checked_sub(1)?).filter(|b| hva - b.start < b.len)
    }

    fn describe_hva(&self, hva: u64) -> String {
        match self.buffer_at(hva) {
            Some(b) => format!("RAM {}+{:#x}", b.name, hva - b.start),
            None => format!("RAM at unknown host address {hva:#x}"),
        }
    }

    /// Whether `hva` lies in a page vCPUs write (a BAR's scratch page): any value is fine there.
    fn in_scratch(&self, hva: u64) -> bool {
        self.buffer_at(hva).is_some_and(|b| hva - b.start >= b.scratch)
    }

    /// The host address of byte `offset` of buffer `name` (0 if there is no such buffer).
    fn hva_of(&self, name: &str, offset: u64) -> u64 {
        self.memory.buffer(name).map_or(0, |b| b.hva().0 + offset)
    }

    /// The pattern value a load of `width` at host address `hva` sees, if `hva` is in a buffer.
    fn pattern_at(&self, hva: u64, width: Width) -> Option<u64> {
        let b = self.buffer_at(hva)?;
        let off = hva - b.start;
        Some(width.extract(pattern_word(b.tag, off & !7), off))
    }

    fn mapped(&self, version: u64, gpa: Gpa) -> Mapped {
        match self.schedule.version(version).lookup(gpa.gfn()) {
            Some(s) => Mapped::Ram { hva: s.hva(gpa.0), readonly: s.readonly() },
            None => Mapped::Mmio,
        }
    }

    /// A checker for vCPU `vcpu`, with shadows taken from memory as it is now (call before the
    /// vCPU runs).
    pub fn checker(&self, vcpu: usize) -> VcpuChecker<'_> {
        let l = self.memory.layout();
        let (region, base) = l.private_area(vcpu);
        let private = self
            .memory
            .buffer(region.name)
            .map(|b| {
                (0..PRIVATE_PER_VCPU)
                    .map(|i| b.read(base + i, Width::W1).unwrap_or(0) as u8)
                    .collect()
            })
            .unwrap_or_default();
        let shared = self.memory.buffer(l.shared.name);
        let own_shared = (0..SHARED_USED / 8)
            .filter(|w| l.shared_owner(*w) == vcpu)
            .map(|w| shared.and_then(|b| b.read(w * 8, Width::W8).ok()).unwrap_or(0))
            .collect();
        VcpuChecker {
            oracle: self,
            vcpu,
            private_base: region.gpa.0 + base,
            private_hva: self.hva_of(region.name, base),
            shared_hva: self.hva_of(l.shared.name, 0),
            rom_hva: self.hva_of(l.rom.name, 0),
            private,
            own_shared,
            scratch: None,
            report: OracleReport::default(),
        }
    }

    /// End-of-run checks on memory, with the vCPUs' final shadows. Call after every vCPU stopped.
    pub fn final_checks(&self, checkers: &[VcpuChecker<'_>]) -> OracleReport {
        let mut r = OracleReport::default();
        let l = self.memory.layout();
        let mut intact = |b: &HostBuffer, upto: u64| {
            r.checked += 1;
            let tag = tag_of(b);
            if let Some(off) =
                (0..upto).step_by(8).find(|o| b.read(*o, Width::W8) != Ok(pattern_word(tag, *o)))
            {
                r.push(Violation {
                    vcpu: None,
                    gpa: None,
                    what: format!("end of run: buffer {} must keep its pattern", b.name()),
                    expected: format!("{:#x} at offset {off:#x}", pattern_word(tag, off)),
                    seen: format!("{:#x}", b.read(off, Width::W8).unwrap_or(0)),
                });
            }
        };
        if let Some(b) = self.memory.buffer(l.rom.name) {
            intact(b, b.len());
        }
        for name in l.bar.buffers {
            if let Some(b) = self.memory.buffer(name) {
                intact(b, l.bar.scratch_offset());
            }
        }
        if let Some(b) = self.memory.buffer(l.dimm.name) {
            intact(b, b.len());
        }
        for c in checkers {
            r.checked += 1;
            let (region, base) = l.private_area(c.vcpu);
            let Some(b) = self.memory.buffer(region.name) else { continue };
            if let Some(i) = (0..PRIVATE_PER_VCPU).find(|i| {
                b.read(base + i, Width::W1).ok() != Some(u64::from(c.private[*i as usize]))
            }) {
                r.push(Violation {
                    vcpu: Some(c.vcpu),
                    gpa: Some(format!("{:#x}", c.private_base + i)),
                    what: "end of run: private memory must hold what the vCPU wrote".into(),
                    expected: format!("{:#x}", c.private[i as usize]),
                    seen: format!("{:#x}", b.read(base + i, Width::W1).unwrap_or(0)),
                });
            }
        }
        r
    }
}

/// One vCPU's judge: its shadows and its verdicts. Owned by the vCPU thread.
#[derive(Debug)]
pub struct VcpuChecker<'a> {
    oracle: &'a Oracle,
    vcpu: usize,
    private_base: u64,
    /// Host addresses of the private area, the shared region and the ROM (provenance checks).
    private_hva: u64,
    shared_hva: u64,
    rom_hva: u64,
    private: Vec<u8>,
    own_shared: Vec<u64>,
    scratch: Option<u64>,
    report: OracleReport,
}

fn describe(o: &Observed, oracle: &Oracle) -> String {
    match o {
        Observed::Ram { hva, value } => format!("{} value {value:#x}", oracle.describe_hva(hva.0)),
        Observed::Mmio { device: true, value } => format!("device MMIO value {value:#x}"),
        Observed::Mmio { device: false, value } => {
            format!("MMIO exit to userspace (value {value:#x})")
        }
        Observed::Error(e) => format!("MMU error: {e}"),
        Observed::GuestPageFault { error } => format!("guest page fault (error {error:#x})"),
    }
}

impl VcpuChecker<'_> {
    /// The vCPU this checker judges.
    pub fn vcpu(&self) -> usize {
        self.vcpu
    }

    /// Its verdicts so far.
    pub fn report(&self) -> &OracleReport {
        &self.report
    }

    /// Takes the verdicts, leaving an empty report.
    pub fn take_report(&mut self) -> OracleReport {
        core::mem::take(&mut self.report)
    }

    fn fail(&mut self, a: &GuestAccess, expected: String, seen: &Observed) {
        let seen = describe(seen, self.oracle);
        self.report.push(Violation {
            vcpu: Some(self.vcpu),
            gpa: Some(format!("{:#x}", a.gpa.0)),
            what: format!("{:?} of {} bytes", a.kind, a.width.bytes()),
            expected,
            seen,
        });
    }

    fn private_value(&self, off: usize, width: Width) -> u64 {
        (0..width.bytes() as usize).fold(0, |v, i| v | u64::from(self.private[off + i]) << (8 * i))
    }

    /// Guest paging, the shared GVA of the shootdowns: the access must have reached one of the
    /// targets the GVA mapped from the last change this vCPU invalidated up to the newest (RAM
    /// at host address `ram_hva`, if that page is one of them; a device page, if one is: the
    /// read of its first register must give that page's identification, one of `device_ids`).
    pub fn check_shared_gva(
        &mut self,
        gva: u64,
        ram_hva: Option<u64>,
        device_ids: &[u64],
        seen: &Observed,
    ) {
        self.report.checked += 1;
        let ok = match seen {
            Observed::Ram { hva, .. } => ram_hva == Some(hva.0),
            Observed::Mmio { device: true, value } => device_ids.contains(value),
            _ => false,
        };
        if !ok {
            let mut expected = Vec::new();
            if let Some(h) = ram_hva {
                expected.push(format!("RAM {}", self.oracle.describe_hva(h)));
            }
            for id in device_ids {
                expected.push(format!("the device page whose identification reads {id:#x}"));
            }
            self.report.push(Violation {
                vcpu: Some(self.vcpu),
                gpa: None,
                what: format!("read of the shared gva {gva:#x} (remapped by INVLPG shootdowns)"),
                expected: expected.join(" or "),
                seen: describe(seen, self.oracle),
            });
        }
    }

    /// Records a failure of the vCPU's own machinery (not an access outcome) as a violation.
    pub fn note_error(&mut self, what: &str) {
        self.report.checked += 1;
        self.report.push(Violation {
            vcpu: Some(self.vcpu),
            gpa: None,
            what: what.to_string(),
            expected: "no error".into(),
            seen: "an error".into(),
        });
    }

    /// Guest paging: an access to a guest-virtual address the vCPU's own tables do not map must
    /// be a guest page fault with `error` (the vCPU changed its tables itself and invalidated the
    /// address, so the expectation is exact).
    pub fn check_page_fault(&mut self, gva: u64, error: u64, seen: &Observed) {
        self.report.checked += 1;
        if *seen != (Observed::GuestPageFault { error }) {
            self.report.push(Violation {
                vcpu: Some(self.vcpu),
                gpa: None,
                what: format!("access to gva {gva:#x}, which the guest's tables forbid"),
                expected: format!("a guest page fault with error code {error:#x}"),
                seen: format!("{seen:?}"),
            });
        }
    }

    /// Judges one access stamped `[start, end]` on the [`Clock`].
    pub fn check(&mut self, a: &GuestAccess, seen: &Observed, start: u64, end: u64) {
        self.report.checked += 1;
        let o = self.oracle;
        let l = o.memory.layout();
        match a.kind {
            MixKind::PrivateRead | MixKind::PrivateWrite => {
                let off = (a.gpa.0 - self.private_base) as usize;
                let at = self.private_hva + off as u64;
                let here = |hva: &Hva| hva.0 == at;
                if a.kind == MixKind::PrivateWrite {
                    for i in 0..a.width.bytes() as usize {
                        self.private[off + i] = (a.value >> (8 * i)) as u8;
                    }
                    if !matches!(seen, Observed::Ram { hva, .. } if here(hva)) {
                        let expected = format!("a write to private RAM {}", o.describe_hva(at));
                        self.fail(a, expected, seen);
                    }
                } else {
                    let want = self.private_value(off, a.width);
                    if !matches!(seen, Observed::Ram { hva, value } if here(hva) && *value == want)
                    {
                        let expected = format!("private {} value {want:#x}", o.describe_hva(at));
                        self.fail(a, expected, seen);
                    }
                }
            }
            MixKind::SharedRead | MixKind::SharedWrite => {
                let word = (a.gpa.0 - l.shared.gpa.0) / 8;
                let owner = l.shared_owner(word);
                let tag = self.oracle.shared_tag;
                let own = (owner == self.vcpu).then(|| (word / l.vcpus as u64) as usize);
                let at = self.shared_hva + word * 8;
                let here = |hva: &Hva| hva.0 == at;
                if a.kind == MixKind::SharedWrite {
                    if let Some(i) = own {
                        self.own_shared[i] = a.value;
                    }
                    if !matches!(seen, Observed::Ram { hva, .. } if here(hva)) {
                        let expected = format!("a write to shared {}", o.describe_hva(at));
                        self.fail(a, expected, seen);
                    }
                } else if let Some(i) = own {
                    let want = self.own_shared[i];
                    if !matches!(seen, Observed::Ram { hva, value } if here(hva) && *value == want)
                    {
                        self.fail(a, format!("shared RAM value {want:#x} (own word)"), seen);
                    }
                } else {
                    let ok = match seen {
                        Observed::Ram { hva, value } => {
                            here(hva)
                                && (*value == pattern_word(tag, word * 8)
                                    || *value & !0xffff_ffff == shared_value(owner, word, 0))
                        }
                        _ => false,
                    };
                    if !ok {
                        self.fail(
                            a,
                            format!("shared RAM holding the pattern or a value of vCPU {owner} for word {word}"),
                            seen,
                        );
                    }
                }
            }
            MixKind::RomRead => {
                let off = a.gpa.0 - l.rom.gpa.0;
                let want = a.width.extract(pattern_word(self.oracle.rom_tag, off & !7), off);
                let at = self.rom_hva + off;
                if !matches!(seen, Observed::Ram { hva, value } if hva.0 == at && *value == want) {
                    self.fail(a, format!("{} value {want:#x}", o.describe_hva(at)), seen);
                }
            }
            MixKind::RomWrite => {
                if !matches!(seen, Observed::Mmio { device: false, .. }) {
                    self.fail(a, "an MMIO exit (the ROM slot is read-only)".into(), seen);
                }
            }
            MixKind::DeviceRead => {
                // The scratch register's value is known once this vCPU wrote it in this run
                // (before that it holds whatever an earlier run left: any device value will do).
                let want = if a.gpa == l.device {
                    Some(RegisterDevice::ID)
                } else if a.gpa.0 == l.device.0 + RegisterDevice::SECOND_ID_OFFSET {
                    Some(RegisterDevice::SECOND_ID)
                } else {
                    self.scratch
                };
                let ok = match (seen, want) {
                    (Observed::Mmio { device: true, value }, Some(w)) => {
                        *value == w & a.width.mask()
                    }
                    (Observed::Mmio { device: true, .. }, None) => true,
                    _ => false,
                };
                if !ok {
                    let expected = match want {
                        Some(w) => format!("device register value {:#x}", w & a.width.mask()),
                        None => "the device".into(),
                    };
                    self.fail(a, expected, seen);
                }
            }
            MixKind::DeviceWrite => {
                self.scratch = Some(a.value);
                if !matches!(seen, Observed::Mmio { device: true, .. }) {
                    self.fail(a, "the device".into(), seen);
                }
            }
            MixKind::BarRead | MixKind::BarWrite | MixKind::DimmRead => {
                self.check_dynamic(a, seen, start, end)
            }
        }
    }

    fn check_dynamic(&mut self, a: &GuestAccess, seen: &Observed, start: u64, end: u64) {
        let (lo, hi) = Clock::window(start, end);
        let o = self.oracle;
        let hi = hi.min(lo + o.schedule.period() - 1);
        let write = a.kind.is_write();
        let ok = (lo..=hi).any(|k| match (o.mapped(k, a.gpa), seen) {
            (Mapped::Mmio, Observed::Mmio { device: false, .. }) => true,
            (Mapped::Ram { readonly: true, .. }, Observed::Mmio { device: false, .. }) => write,
            // Provenance first: the data must come from the host address this version maps.
            (Mapped::Ram { hva, readonly }, Observed::Ram { hva: got, value }) => {
                got.0 == hva
                    && if write {
                        !readonly
                    } else {
                        o.in_scratch(hva) || o.pattern_at(hva, a.width) == Some(*value)
                    }
            }
            _ => false,
        });
        if !ok {
            let expected: Vec<String> = (lo..=hi)
                .map(|k| match o.mapped(k, a.gpa) {
                    Mapped::Mmio => format!("v{k}: MMIO exit"),
                    Mapped::Ram { hva, .. } if write => format!("v{k}: {}", o.describe_hva(hva)),
                    Mapped::Ram { hva, .. } => format!(
                        "v{k}: {} value {:#x}",
                        o.describe_hva(hva),
                        o.pattern_at(hva, a.width).unwrap_or(0)
                    ),
                })
                .collect();
            self.fail(a, expected.join(" or "), seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostConfig, SimHost};
    use crate::layout::MachineLayout;

    fn oracle() -> Oracle {
        let host = Arc::new(SimHost::new(HostConfig::new(40)).expect("host"));
        let mem = MachineLayout::new(2).build(&host).expect("build");
        let s = Arc::new(Schedule::device_manager(&mem, 40).expect("schedule"));
        Oracle::new(mem, s)
    }

    #[test]
    fn window_follows_the_stamps() {
        // No update started: version 0 only.
        assert_eq!(Clock::window(0, 0), (0, 0));
        // Update 1 started before the access ended: version 0 or 1.
        assert_eq!(Clock::window(0, 1), (0, 1));
        // Update 1 ended before the access started: version 1 only.
        assert_eq!(Clock::window(2, 2), (1, 1));
        // Started during update 1, ended during update 3: versions 0..=3.
        assert_eq!(Clock::window(1, 5), (0, 3));
        let c = Clock::new();
        assert_eq!((c.tick(), c.tick(), c.now()), (1, 2, 2));
    }

    fn bar_read(o: &Oracle, pos: usize, off: u64) -> (GuestAccess, u64, u64) {
        let l = o.memory.layout();
        let a = GuestAccess {
            kind: MixKind::BarRead,
            gpa: Gpa(l.bar.positions[pos].0 + off),
            width: Width::W8,
            value: 0,
        };
        let bar0 = o.memory.buffer("bar0").expect("bar0");
        (a, bar0.hva().0 + off, pattern_word(tag_of(bar0), off))
    }

    #[test]
    fn bar_reads_are_judged_against_the_window() {
        let o = oracle();
        let mut c = o.checker(0);
        let (a, hva, pat) = bar_read(&o, 0, 0x40);
        let ram = Observed::Ram { hva: Hva(hva), value: pat };
        let exit = Observed::Mmio { device: false, value: 0 };
        // Version 0: the BAR is unmapped.
        c.check(&a, &exit, 0, 0);
        assert_eq!(c.report().violations, 0);
        c.check(&a, &ram, 0, 0);
        assert_eq!(c.report().violations, 1, "RAM before the BAR was ever mapped");
        // Version 1: bar0 at position 0; during update 1 either is fine.
        c.check(&a, &ram, 1, 1);
        c.check(&a, &exit, 1, 1);
        c.check(&a, &ram, 2, 2);
        assert_eq!(c.report().violations, 1);
        c.check(&a, &exit, 2, 2);
        assert_eq!(c.report().violations, 2, "MMIO after the map returned");
        // Version 2 (moved to position 1): a stale read of position 0 is caught.
        c.check(&a, &ram, 4, 4);
        assert_eq!(c.report().violations, 3);
        // A wrong value is caught even when RAM is allowed.
        c.check(&a, &Observed::Ram { hva: Hva(hva), value: pat ^ 1 }, 2, 2);
        assert_eq!(c.report().violations, 4);
        // So is the right value read from another frame (e.g. a stale translation to bar1,
        // whose page happens to hold the same bytes).
        c.check(&a, &Observed::Ram { hva: Hva(hva + 0x1000), value: pat }, 2, 2);
        assert_eq!(c.report().violations, 5);
        assert_eq!(c.report().checked, 9);
        let v = &c.report().first_violations[0];
        assert_eq!(v.vcpu, Some(0));
        assert!(v.expected.contains("v0: MMIO exit"), "{v}");
        assert!(v.seen.contains("bar0+0x40"), "{v}");
    }

    #[test]
    fn private_shadow_catches_a_lost_write() {
        let o = oracle();
        let mut c = o.checker(1);
        let (region, base) = o.memory.layout().private_area(1);
        let gpa = Gpa(region.gpa.0 + base + 16);
        let w =
            GuestAccess { kind: MixKind::PrivateWrite, gpa, width: Width::W4, value: 0xdead_beef };
        let r = GuestAccess { kind: MixKind::PrivateRead, gpa, width: Width::W2, value: 0 };
        let hva = Hva(o.memory.buffer(region.name).expect("private").hva().0 + base + 16);
        c.check(&w, &Observed::Ram { hva, value: 0xdead_beef }, 0, 0);
        c.check(&r, &Observed::Ram { hva, value: 0xbeef }, 0, 0);
        assert_eq!(c.report().violations, 0);
        c.check(&r, &Observed::Ram { hva, value: 0x1234 }, 0, 0);
        assert_eq!(c.report().violations, 1);
        // The right value from the wrong frame is caught too (provenance).
        c.check(&r, &Observed::Ram { hva: Hva(hva.0 + 4096), value: 0xbeef }, 0, 0);
        assert_eq!(c.report().violations, 2);
        // Memory never got the write: the end check notices.
        let fin = o.final_checks(&[c]);
        assert_eq!(fin.violations, 1, "{:?}", fin.first_violations);
    }

    #[test]
    fn rom_and_device_rules() {
        let o = oracle();
        let l = o.memory.layout().clone();
        let mut c = o.checker(0);
        let w = GuestAccess { kind: MixKind::RomWrite, gpa: l.rom.gpa, width: Width::W1, value: 1 };
        c.check(&w, &Observed::Mmio { device: false, value: 0 }, 0, 0);
        c.check(&w, &Observed::Ram { hva: Hva(0), value: 1 }, 0, 0);
        let id =
            GuestAccess { kind: MixKind::DeviceRead, gpa: l.device, width: Width::W4, value: 0 };
        c.check(&id, &Observed::Mmio { device: true, value: RegisterDevice::ID }, 0, 0);
        c.check(&id, &Observed::Mmio { device: false, value: 0 }, 0, 0);
        assert_eq!(c.report().violations, 2);
        // The second ID page reads its own value: the first page's is a violation there.
        let id2 = GuestAccess { gpa: Gpa(l.device.0 + RegisterDevice::SECOND_ID_OFFSET), ..id };
        c.check(&id2, &Observed::Mmio { device: true, value: RegisterDevice::SECOND_ID }, 0, 0);
        c.check(&id2, &Observed::Mmio { device: true, value: RegisterDevice::ID }, 0, 0);
        assert_eq!(c.report().violations, 3);
        assert_eq!(o.final_checks(&[]).violations, 0, "untouched memory keeps its patterns");
    }
}
