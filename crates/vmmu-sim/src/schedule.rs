//! The device manager's schedule of memslot operations, as data: a cycle of requests, the result
//! KVM gives each, and the slot map in force after each.
//!
//! The cycle maps the BAR, slides it half its size down and back (moves whose new range overlaps
//! the old one: a GPA in the overlap is RAM before and after, so it must never be MMIO in between),
//! moves it, hot-plugs the DIMM, unmaps the BAR, tries an overlapping map that KVM refuses
//! (`EEXIST`), maps the BAR with its other buffer at the other position, moves it back, removes
//! the DIMM and unmaps the BAR, which brings the map back to where it started, so the device
//! manager can repeat it for as long as the run lasts.
//!
//! Versions: the map after `k` requests of the run (failed ones count: they leave the map as it
//! was) is [`Schedule::version`]`(k)`; version 0 has only the static slots.

use crate::layout::MachineMemory;
use crate::seam::{Errno, SlotRequest};
use crate::slots::SlotTable;
use vmmu::types::Gpa;

/// One step: a request, what it does, and what KVM answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledRequest {
    /// What the step does, for messages.
    pub label: &'static str,
    /// The request.
    pub request: SlotRequest,
    /// `Ok` or the errno KVM returns.
    pub expect: Result<(), Errno>,
}

/// Why a schedule could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// The layout lacks a buffer the schedule uses.
    #[error("the machine memory has no buffer {0:?}")]
    MissingBuffer(&'static str),
    /// A step's stated result disagrees with KVM's rules (a bug in the schedule).
    #[error("schedule step {index} ({label}) would give {got:?}, not the {want:?} it states")]
    Inconsistent {
        /// Step index.
        index: usize,
        /// Step label.
        label: &'static str,
        /// What the rules give.
        got: Result<(), Errno>,
        /// What the step says.
        want: Result<(), Errno>,
    },
    /// The cycle does not return to the initial map.
    #[error("the schedule does not return to its initial map, so it cannot repeat")]
    NotACycle,
}

/// A cyclic memslot schedule and the maps it produces.
#[derive(Clone, Debug)]
pub struct Schedule {
    steps: Vec<ScheduledRequest>,
    /// `versions[i]` = the map after `i` steps of one cycle; `versions[0]` is the initial map.
    versions: Vec<SlotTable>,
}

impl Schedule {
    /// Checks `steps` against KVM's rules starting from `initial`, and records the maps. The
    /// steps must bring the map back to `initial`.
    pub fn new(
        initial: SlotTable,
        steps: Vec<ScheduledRequest>,
    ) -> Result<Schedule, ScheduleError> {
        let mut versions = vec![initial.clone()];
        let mut t = initial;
        for (index, s) in steps.iter().enumerate() {
            let got = t.apply(&s.request).map_err(Errno::from);
            if got != s.expect {
                return Err(ScheduleError::Inconsistent {
                    index,
                    label: s.label,
                    got,
                    want: s.expect,
                });
            }
            versions.push(t.clone());
        }
        if versions.last() != versions.first() || steps.is_empty() {
            return Err(ScheduleError::NotACycle);
        }
        versions.pop();
        Ok(Schedule { steps, versions })
    }

    /// The default device manager's schedule for `mem` (see the module doc), for an MMU that
    /// maps guest-physical addresses below `2^phys_bits`.
    pub fn device_manager(mem: &MachineMemory, phys_bits: u8) -> Result<Schedule, ScheduleError> {
        Self::device_manager_with(mem, phys_bits, 0)
    }

    /// As [`Schedule::device_manager`], with `dimm_flags` (`KVM_MEM_*`) on the DIMM's hot-plug
    /// (the wrap trap plugs it dirty-logged, so it is mapped with 4 KiB leaves).
    pub fn device_manager_with(
        mem: &MachineMemory,
        phys_bits: u8,
        dimm_flags: u32,
    ) -> Result<Schedule, ScheduleError> {
        let l = mem.layout();
        let bar = &l.bar;
        let req = |gpa: Gpa, buf: &'static str, size: u64, slot: u16| {
            mem.request(slot, gpa, buf, size, false).ok_or(ScheduleError::MissingBuffer(buf))
        };
        let [p0, p1] = bar.positions;
        let [b0, b1] = bar.buffers;
        let step = |label, request, expect| ScheduledRequest { label, request, expect };
        let mut dimm = req(l.dimm.gpa, l.dimm.name, l.dimm.size, l.dimm.slot)?;
        dimm.flags |= dimm_flags;
        let steps = vec![
            step("bar: map bar0 at position 0", req(p0, b0, bar.size, bar.slot)?, Ok(())),
            step(
                "bar: slide down (overlapping move)",
                req(bar.slide, b0, bar.size, bar.slot)?,
                Ok(()),
            ),
            step("bar: slide back (overlapping move)", req(p0, b0, bar.size, bar.slot)?, Ok(())),
            step("bar: move to position 1", req(p1, b0, bar.size, bar.slot)?, Ok(())),
            step("dimm: hot-plug", dimm, Ok(())),
            step("bar: unmap", SlotRequest::delete(bar.slot.into()), Ok(())),
            step(
                "bar: map over the dimm (refused)",
                req(l.dimm.gpa, b1, bar.size, bar.slot)?,
                Err(Errno::Eexist),
            ),
            step("bar: map bar1 at position 1", req(p1, b1, bar.size, bar.slot)?, Ok(())),
            step("bar: move to position 0", req(p0, b1, bar.size, bar.slot)?, Ok(())),
            step("dimm: remove", SlotRequest::delete(l.dimm.slot.into()), Ok(())),
            step("bar: unmap", SlotRequest::delete(bar.slot.into()), Ok(())),
        ];
        let mut initial = SlotTable::new(phys_bits);
        for r in mem.static_requests() {
            // The static slots are valid by construction of the layout; a failure here is a
            // layout bug, reported as an inconsistent step.
            initial.apply(&r).map_err(|e| ScheduleError::Inconsistent {
                index: 0,
                label: "static slot",
                got: Err(Errno::of(&e)),
                want: Ok(()),
            })?;
        }
        Schedule::new(initial, steps)
    }

    /// The steps of one cycle.
    pub fn steps(&self) -> &[ScheduledRequest] {
        &self.steps
    }

    /// The step the device manager runs as its `n`-th request (0-based).
    pub fn step(&self, n: u64) -> &ScheduledRequest {
        &self.steps[(n % self.steps.len() as u64) as usize]
    }

    /// The map after `k` requests.
    pub fn version(&self, k: u64) -> &SlotTable {
        &self.versions[(k % self.versions.len() as u64) as usize]
    }

    /// Distinct versions (the cycle length).
    pub fn period(&self) -> u64 {
        self.versions.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{HostConfig, SimHost};
    use crate::layout::MachineLayout;
    use std::sync::Arc;

    fn memory() -> MachineMemory {
        let host = Arc::new(SimHost::new(HostConfig::new(40)).expect("host"));
        MachineLayout::new(2).build(&host).expect("build")
    }

    #[test]
    fn default_schedule_cycles_and_moves_the_bar() {
        let mem = memory();
        let s = Schedule::device_manager(&mem, 40).expect("schedule");
        assert_eq!(s.period(), 11);
        let bar = &mem.layout().bar;
        let p0 = bar.positions[0].gfn();
        let p1 = bar.positions[1].gfn();
        let dimm = mem.layout().dimm.gpa.gfn();
        let at = |k: u64, gfn| s.version(k).lookup(gfn).map(|sl| sl.id);
        // version: 0 none, 1 bar@p0, 2 slid (still over p0), 3 bar@p0, 4 bar@p1, 5 +dimm, 6 -bar,
        // 7 same (EEXIST), 8 bar@p1, 9 bar@p0, 10 -dimm, then back to 0.
        let b = Some(10);
        let expect_p0 = [None, b, b, b, None, None, None, None, None, b, b];
        let expect_p1 = [None, None, None, None, b, b, None, None, b, None, None];
        for k in 0..11u64 {
            assert_eq!(at(k, p0), expect_p0[k as usize], "p0 at version {k}");
            assert_eq!(at(k, p1), expect_p1[k as usize], "p1 at version {k}");
            assert_eq!(at(k + 11, p0), at(k, p0), "periodic");
        }
        // The slide maps p0 to the second half of the buffer, and the second half of p0 to
        // nothing.
        let hva =
            |k: u64, gfn: vmmu::types::Gfn| s.version(k).lookup(gfn).map(|sl| sl.hva(gfn.0 << 12));
        assert_eq!(hva(2, p0), hva(1, p0).map(|h| h + bar.size / 2));
        assert_eq!(at(2, vmmu::types::Gfn(p0.0 + 256)), None);
        assert_eq!(at(5, dimm), Some(11));
        assert_eq!(at(10, dimm), None);
        assert_eq!(s.version(6), s.version(7), "a refused request changes nothing");
        assert_eq!(s.step(11), s.step(0));
    }

    #[test]
    fn a_wrong_expectation_is_reported() {
        let mem = memory();
        let mut steps = Schedule::device_manager(&mem, 40).expect("schedule").steps().to_vec();
        steps[6].expect = Ok(());
        let initial = Schedule::device_manager(&mem, 40).expect("schedule").version(0).clone();
        assert!(matches!(
            Schedule::new(initial.clone(), steps),
            Err(ScheduleError::Inconsistent { index: 6, .. })
        ));
        let one = vec![Schedule::device_manager(&mem, 40).expect("s").steps()[0].clone()];
        assert_eq!(Schedule::new(initial, one).err(), Some(ScheduleError::NotACycle));
    }
}
