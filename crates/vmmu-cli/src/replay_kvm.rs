//! The `/dev/kvm` half of `vmmu replay`: the trace's memslot requests on real KVM, exactly as
//! recorded (only `uaddr` remapped, unions of overlapping ranges onto one buffer as on the
//! software machine), and each recorded MMIO access (or a stride sample of them, see
//! [`MAX_MMIO`]) as one guest load or store that must exit as MMIO at its address, and each
//! dirty-log call as that ioctl on the slot (manual protection enabled when the trace clears),
//! which KVM must accept.

use vmmu::memslot::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use vmmu::types::{AsId, SlotId};
use vmmu_sim::replay::parse::EventOp;
use vmmu_sim::replay::{KvmReport, Trace};
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use {
    std::ops::ControlFlow,
    vmmu_kvm::replay::{Access, TraceVm},
    vmmu_sim::replay::inflight::InFlight,
    vmmu_sim::replay::parse::{Dir, Event, EventKind, MmioEvent, SlotEvent},
    vmmu_sim::replay::report::{Misclassified, Refusal, KEEP},
};

/// How many MMIO accesses are checked on KVM per trace besides the first ones (see [`Sampler`]):
/// each is a `KVM_RUN` round trip (tens of microseconds on a nested host), and a full recording
/// has about 21,000. Beyond this, every k-th access is checked (k = ceil(events / MAX_MMIO)).
pub const MAX_MMIO: u64 = 3000;

/// The most "first access" checks per trace (see [`Sampler`]); past it only the stride samples.
pub const MAX_FIRST: u64 = 20_000;

/// Which recorded MMIO accesses the KVM half performs.
///
/// Whether KVM exits for an access depends only on the memslots live at that point, the page
/// (slots are page-granular and no recorded access crosses a page) and the direction (a write to
/// a read-only slot exits, a read does not). So the first access to each page in each direction
/// after every slot request is checked, which gives KVM's verdict for every access of the trace
/// however rare (a handful of ROM writes among 20,000 VGA writes), and on top every k-th access,
/// so that long runs against one page still go through KVM now and then. At most [`MAX_FIRST`]
/// first accesses are checked; later ones fall back to the stride.
#[derive(Debug)]
struct Sampler {
    stride: u64,
    index: u64,
    firsts: u64,
    seen: std::collections::HashSet<(u64, bool)>,
}

impl Sampler {
    fn new(total: u64) -> Sampler {
        Sampler {
            stride: total.div_ceil(MAX_MMIO).max(1),
            index: 0,
            firsts: 0,
            seen: Default::default(),
        }
    }

    /// A slot request was made: every page may classify differently from now on.
    fn slots_changed(&mut self) {
        self.seen.clear();
    }

    /// Whether to perform the next recorded access, at `gpa`, a write or not.
    fn take(&mut self, gpa: u64, write: bool) -> bool {
        self.index += 1;
        let strided = (self.index - 1) % self.stride == 0;
        let first = self.firsts < MAX_FIRST && self.seen.insert((gpa >> 12, write));
        self.firsts += u64::from(first);
        first || strided
    }

    /// Which MMIO accesses were checked, for the report.
    fn note(&self, checked: u64, total: u64) -> String {
        if self.stride <= 1 {
            return format!("all {total} MMIO accesses");
        }
        let stride = self.stride;
        let suffix = match (stride % 10, stride % 100) {
            (_, 11..=13) => "th",
            (1, _) => "st",
            (2, _) => "nd",
            (3, _) => "rd",
            _ => "th",
        };
        format!(
            "{checked} of {total} MMIO accesses (the first to each page in each direction after every slot request, and every {stride}{suffix})"
        )
    }
}

/// A report saying the KVM run was skipped and why.
pub fn skipped(why: &str) -> KvmReport {
    KvmReport { skipped: Some(why.to_string()), ..KvmReport::default() }
}

/// Replays `trace` on `/dev/kvm`, or says why it was skipped.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub fn run(trace: &Trace) -> KvmReport {
    let mut replay = match Replay::new(trace) {
        Ok(replay) => replay,
        Err(report) => return *report,
    };
    let t0 = std::time::Instant::now();
    for e in &trace.events {
        if replay.event(e).is_break() {
            break;
        }
    }
    replay.finish(t0)
}

/// The VM a trace replays on, with what the report's method note says about its setup.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
struct Setup {
    vm: TraceVm,
    /// Whether the trace makes address-space-1 (SMM) slots.
    smm: bool,
    /// Whether they are made here (this kernel has an SMM address space).
    smm_here: bool,
    /// The note on the high alias window, empty without one.
    high_note: String,
}

/// Probes KVM, checks that the trace's slots fit this host, places the guest among them and
/// makes the VM; else the report that says why the KVM run was skipped or could not start.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn set_up(trace: &Trace) -> Result<Setup, Box<KvmReport>> {
    let skip = |why: String| Box::new(skipped(&why));
    let info = vmmu_kvm::probe().map_err(skip)?;
    // The ranges the trace's creates and moves may occupy: not a request KVM refuses on any
    // host whatever its place (more pages than a slot may have, or a range past 2^64), which
    // leaves room for the guest and is then asked of KVM, which refuses it too.
    let slots = trace.events.iter().filter_map(|e| match e.kind {
        EventKind::Slot(s)
            if s.size > 0
                && s.size >> 12 <= vmmu::memslot::KVM_MEM_MAX_NR_PAGES
                && s.gpa.checked_add(s.size).is_some() =>
        {
            Some((s.as_id, s.gpa, s.size))
        }
        _ => None,
    });
    let mmio = trace.events.iter().filter_map(|e| match e.kind {
        EventKind::Mmio(m) => Some(m.gpa),
        _ => None,
    });
    metadata_fits(trace).map_err(skip)?;
    let base = TraceVm::place(slots, mmio.clone()).map_err(skip)?;
    let high = TraceVm::high_frames(mmio, info.guest_phys_bits).map_err(skip)?;
    let high_note = if high.is_empty() {
        String::new()
    } else {
        format!(
            "; accesses at or above {:#x} through a high alias window for {} 2 MiB frames",
            vmmu_scenario::ACCESS_LIMIT,
            high.len()
        )
    };
    let smm = trace.events.iter().any(|e| matches!(e.kind, EventKind::Slot(s) if s.as_id == 1));
    // Without an SMM address space here, the address-space-1 requests cannot be made. They
    // change nothing a guest outside SMM sees (memslots, ids and overlap rules are per address
    // space), so the rest of the trace is still checked, and the report counts what was left out.
    let smm_here = smm && info.address_spaces >= 2;
    let unions = vmmu_sim::replay::memory::uaddr_unions(trace);
    let ids = trace.events.iter().filter_map(|e| match e.kind {
        EventKind::Slot(s) => Some((s.as_id, s.id)),
        _ => None,
    });
    let own_slot = TraceVm::own_slot(ids).map_err(skip)?;
    let vm =
        TraceVm::new(&unions, if smm_here { 2 } else { 1 }, base, own_slot, high).map_err(|e| {
            let error = Some(format!("cannot set up the VM: {e}"));
            Box::new(KvmReport { error, ..KvmReport::default() })
        })?;
    Ok(Setup { vm, smm, smm_here, high_note })
}

/// Whether KVM's per-slot metadata for the trace's slot requests fits this host's memory (when
/// the host says how much it has).
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn metadata_fits(trace: &Trace) -> Result<(), String> {
    let Some((rmaps, available)) = TraceVm::host_memory() else {
        return Ok(());
    };
    let requests = trace.events.iter().filter_map(|e| match e.kind {
        // KVM refuses a request of the wrong shape before it allocates anything.
        EventKind::Slot(s) if vmmu_sim::replay::memory::acceptable_somewhere(&s) => {
            Some((s.as_id, s.id, s.size, s.dirty_log))
        }
        _ => None,
    });
    TraceVm::metadata_fits(requests, rmaps, available)
}

/// A trace's replay on its VM: the report so far and which recorded MMIO accesses to perform.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
struct Replay {
    setup: Setup,
    r: KvmReport,
    /// The trace's MMIO accesses.
    total: u64,
    sampler: Sampler,
    /// The latest slot request's window (another vCPU's access may have raced it).
    in_flight: InFlight,
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl Replay {
    /// The replay of `trace` on a new VM, with manual dirty-log protection if the trace clears
    /// dirty logs; else the report that says why it cannot run.
    fn new(trace: &Trace) -> Result<Replay, Box<KvmReport>> {
        let mut setup = set_up(trace)?;
        let mut r = KvmReport { ran: true, ..KvmReport::default() };
        if trace.count(EventOp::ClearDirtyLog) > 0 {
            if let Err(why) = setup.vm.enable_manual_dirty_log() {
                r.error = Some(format!("cannot enable manual dirty-log protection: {why}"));
                return Err(Box::new(r));
            }
        }
        let total = trace.count(EventOp::Mmio);
        let in_flight = InFlight::new(trace.summary.as_ref().and_then(|s| s.vcpu_threads));
        Ok(Replay { setup, r, total, sampler: Sampler::new(total), in_flight })
    }

    /// Replays event `e`; `Break` once an access could not be made (the report's error says
    /// why).
    fn event(&mut self, e: &Event) -> ControlFlow<()> {
        let (smm, smm_here) = (self.setup.smm, self.setup.smm_here);
        // Every memslot ioctl the VMM made, whether made here or not, ends the last one's window.
        match e.kind {
            EventKind::Slot(s) => self.in_flight.slot(&s),
            EventKind::GetDirtyLog { .. } | EventKind::ClearDirtyLog { .. } => {
                self.in_flight.dirty_log_call()
            }
            EventKind::Mmio(_) | EventKind::KvmZapAllFast => {}
        }
        match e.kind {
            EventKind::Slot(s) if s.as_id == 1 && !smm_here => self.r.smm_skipped += 1,
            // Only where the trace made SMM slots: a call on address space 1 of a trace that
            // never made one is KVM's to refuse, on any kernel.
            EventKind::GetDirtyLog { as_id: 1, .. } | EventKind::ClearDirtyLog { as_id: 1, .. }
                if smm && !smm_here =>
            {
                self.r.smm_skipped += 1
            }
            EventKind::Slot(s) => self.slot(e.line, &s),
            EventKind::Mmio(m) => return self.mmio(e.line, &m),
            EventKind::GetDirtyLog { as_id, id } | EventKind::ClearDirtyLog { as_id, id, .. } => {
                self.dirty_log(e, as_id, id)
            }
            EventKind::KvmZapAllFast => {}
        }
        ControlFlow::Continue(())
    }

    /// Slot request `s` (trace line `line`) as `KVM_SET_USER_MEMORY_REGION`.
    fn slot(&mut self, line: usize, s: &SlotEvent) {
        let slot = SlotId::join(AsId(s.as_id), SlotId(s.id));
        let mut flags = 0;
        if s.dirty_log {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        if s.readonly {
            flags |= KVM_MEM_READONLY;
        }
        self.sampler.slots_changed();
        // A delete's uaddr only has to have a shape its recording host accepted (see
        // `delete_uaddr`); a slot's own uaddr is in a union and remapped by `set_region`.
        let uaddr =
            if s.size == 0 { vmmu_sim::replay::memory::delete_uaddr(s.uaddr) } else { s.uaddr };
        match self.setup.vm.set_region(slot, flags, s.gpa, s.size, uaddr) {
            Ok(()) => self.r.slots_applied += 1,
            Err(errno) => {
                self.r.slots_refused += 1;
                let name = format!("{}/{}", s.as_id, s.id);
                self.refuse(line, name, errno, "KVM_SET_USER_MEMORY_REGION");
            }
        }
    }

    /// MMIO access `m` (trace line `line`), if the sampler takes it, as a guest load or store
    /// that must exit as MMIO; `Break` if KVM could not run it.
    fn mmio(&mut self, line: usize, m: &MmioEvent) -> ControlFlow<()> {
        if !self.sampler.take(m.gpa, m.dir == Dir::Write) {
            return ControlFlow::Continue(());
        }
        let r = &mut self.r;
        let write = match m.dir {
            Dir::Read => None,
            Dir::Write => Some(m.value.unwrap_or(0)),
        };
        r.mmio_checked += 1;
        match self.setup.vm.access(m.gpa, m.len, write, m.value.unwrap_or(0)) {
            Ok(Access::Mmio) => r.mmio_exits += 1,
            Ok(Access::Memory) if self.in_flight.may_have_raced(m.gpa, write.is_some()) => {
                r.mmio_raced += 1;
            }
            Ok(Access::Memory) => {
                r.mmio_not_mmio += 1;
                if r.first_not_mmio.len() < KEEP {
                    let seen = "no exit: KVM let the guest reach memory".into();
                    r.first_not_mmio.push(Misclassified::new(line, m.gpa, write.is_some(), seen));
                }
            }
            Err(err) => {
                r.error = Some(format!("line {line}: {err}"));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// Dirty-log call `e` (a `get-dirty-log` or `clear-dirty-log` event) on slot `id` of
    /// address space `as_id`, as its ioctl.
    fn dirty_log(&mut self, e: &Event, as_id: u16, id: u16) {
        let slot = SlotId::join(AsId(as_id), SlotId(id));
        let result = match e.kind {
            EventKind::ClearDirtyLog { first_page, num_pages, .. } => {
                self.setup.vm.clear_dirty_log(slot, first_page, num_pages)
            }
            // A slot the trace never created (or deleted): KVM is asked all the same, so
            // its errno is KVM's (EINVAL for a bad id or address space, else ENOENT).
            _ => self.setup.vm.get_dirty_log(slot),
        };
        match result {
            Ok(()) => self.r.dirty_log_applied += 1,
            Err(errno) => {
                self.r.dirty_log_refused += 1;
                let what = match e.kind {
                    EventKind::GetDirtyLog { .. } => "KVM_GET_DIRTY_LOG",
                    _ => "KVM_CLEAR_DIRTY_LOG",
                };
                self.refuse(e.line, format!("{as_id}/{id}"), errno, what);
            }
        }
    }

    /// Keeps KVM's refusal of the request on trace line `line` (one of the first [`KEEP`]).
    fn refuse(&mut self, line: usize, slot: String, errno: String, what: &str) {
        let r = &mut self.r;
        if r.first_refusals.len() < KEEP {
            r.first_refusals.push(Refusal { line, slot, errno, reason: what.to_string() });
        }
    }

    /// The report, with its method note: what was replayed and how, where the guest sat, the
    /// high window's and skipped SMM requests' notes, and the time since `t0`.
    fn finish(self, t0: std::time::Instant) -> KvmReport {
        let Replay { setup, mut r, total, sampler, .. } = self;
        let sample = sampler.note(r.mmio_checked, total);
        let smm_note = if r.smm_skipped > 0 {
            format!(
                "; {} address-space-1 (SMM) requests not made: this kernel has no SMM address space",
                r.smm_skipped
            )
        } else {
            String::new()
        };
        let Setup { vm, high_note, .. } = setup;
        r.method = format!(
            "slot requests as recorded, uaddr remapped; {sample} as CPL3 loads/stores that must exit as MMIO; dirty-log calls as recorded (clears with every bit of the range set); guest at {:#x}, sync store at {:#x}{high_note}{smm_note}; {:.2} s",
            vm.base(),
            vm.sync(),
            t0.elapsed().as_secs_f64()
        );
        r
    }
}

/// Replays `trace` on `/dev/kvm`: not on this platform.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
pub fn run(_trace: &Trace) -> KvmReport {
    skipped("/dev/kvm not usable: the KVM replayer needs Linux on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_note_uses_english_ordinals() {
        assert_eq!(Sampler::new(2376).note(2376, 2376), "all 2376 MMIO accesses");
        let every = |stride| Sampler { stride, ..Sampler::new(1) }.note(1, 2);
        assert!(every(2).ends_with("every 2nd)"), "{}", every(2));
        assert!(every(3).ends_with("every 3rd)"));
        assert!(every(8).ends_with("every 8th)"));
        assert!(every(11).ends_with("every 11th)") && every(12).ends_with("every 12th)"));
        assert!(every(21).ends_with("every 21st)") && every(22).ends_with("every 22nd)"));
    }

    /// A few ROM writes among 30,000 VGA writes are all checked (a stride alone would check
    /// one in ten), once per slot layout: the same page and direction after a slot request is
    /// checked again, a read of a page already written is checked on its own.
    #[test]
    fn rare_accesses_are_checked_in_every_slot_layout() {
        let mut s = Sampler::new(30_010);
        let mut checked = Vec::new();
        let mut take = |s: &mut Sampler, i: u64, gpa: u64, write: bool| {
            if s.take(gpa, write) {
                checked.push(i);
            }
        };
        for i in 0..30_000 {
            take(&mut s, i, 0xb8000 + (i % 0x1000), true);
            if i % 5000 == 4999 {
                take(&mut s, 100_000 + i, 0xfffff000 + 8 * (i / 5000), true);
            }
        }
        s.slots_changed();
        take(&mut s, 200_000, 0xfffff004, true);
        take(&mut s, 200_001, 0xfffff008, true);
        take(&mut s, 200_002, 0xfffff00c, false);
        assert_eq!(s.stride, 11);
        let roms: Vec<u64> = checked.iter().copied().filter(|&i| i >= 100_000).collect();
        assert_eq!(
            roms,
            [104_999, 200_000, 200_002],
            "the first ROM write of each layout, and the read"
        );
        // The VGA page's first write, then about every 11th access (the stride counts the ROM
        // writes too).
        assert_eq!(checked[0], 0);
        let vga = checked.iter().filter(|&&i| i < 100_000).count();
        assert!((30_000 / 11..=30_010usize.div_ceil(11)).contains(&vga), "{vga}");
    }

    /// Past MAX_FIRST first accesses, only the stride decides.
    #[test]
    fn first_accesses_stop_at_their_budget() {
        let total = 2 * MAX_FIRST + 100;
        let mut s = Sampler::new(total);
        let n = (0..total).filter(|&i| s.take(i << 12, false)).count() as u64;
        let stride = total.div_ceil(MAX_MMIO);
        assert_eq!(n, MAX_FIRST + total.div_ceil(stride) - MAX_FIRST.div_ceil(stride));
    }
}
