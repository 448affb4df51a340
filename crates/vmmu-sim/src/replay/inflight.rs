//! Which recorded MMIO accesses may have raced a slot request of another thread.
//!
//! The kit stamps a `slot` event when the VMM enters `ioctl()`, and KVM installs the new slot
//! some time before the ioctl returns. With more than one vCPU thread, another vCPU's access
//! in that window still sees the old memory map: an access KVM emulated as MMIO (there was no
//! slot yet) is recorded after the request that made its address RAM. Replayed in file order,
//! the request comes first, so the access reaches RAM, on the software machine and on
//! `/dev/kvm` alike; that is the recording's order, not a misclassification (hunt 43r: a
//! 2-vCPU flash-toggle loop hit it in 903 of 1500 re-creations).
//!
//! The window of a request ends when the VMM's next memslot ioctl (a slot request or a
//! dirty-log call) is made: QEMU makes those one at a time under its big lock, so a request is
//! complete once the next one is stamped. So an access may have raced only the
//! latest slot request, only if that request made its address RAM for it (a create, or a move
//! whose new range covers it and whose old one did not; not read-only for a store), and only in
//! a trace of more than one vCPU thread (with one, the replay is exact: traces.md).
//!
//! Invariant: [`InFlight::may_have_raced`] is true only inside the range the latest slot
//! request of address space 0 gave, before any later slot request or dirty-log call.

use super::parse::SlotEvent;
use std::collections::BTreeMap;

/// A guest-physical range `[start, end)`.
type Range = (u64, u64);

/// The latest slot request's window (see the module doc).
#[derive(Debug, Default)]
pub struct InFlight {
    /// Whether the trace had more than one vCPU thread.
    multi_vcpu: bool,
    /// The slots of address space 0 as the recording made them (every recorded request
    /// succeeded there, traces.md), by id.
    live: BTreeMap<u16, Range>,
    /// What the latest request made RAM, if anything: its new range, the part of it the slot
    /// already covered before (a move's overlap, RAM all along), and whether it is read-only.
    latest: Option<(Range, Option<Range>, bool)>,
}

impl InFlight {
    /// The window tracker for a trace with `vcpu_threads` threads (from its summary; `None`
    /// when it has none: then the replay stays exact).
    pub fn new(vcpu_threads: Option<u64>) -> Self {
        InFlight {
            multi_vcpu: vcpu_threads.is_some_and(|n| n > 1),
            live: BTreeMap::new(),
            latest: None,
        }
    }

    /// A slot request was made, as recorded: it closes the last window and opens its own if it
    /// made a range RAM (a create, or a move's new range); a delete, a flags-only change (which
    /// leaves the slot where it is) or a request of address space 1 opens none.
    pub fn slot(&mut self, s: &SlotEvent) {
        self.latest = None;
        if s.as_id != 0 {
            return;
        }
        if s.size == 0 {
            self.live.remove(&s.id);
            return;
        }
        let new = (s.gpa, s.gpa.saturating_add(s.size));
        let old = self.live.insert(s.id, new);
        if old != Some(new) {
            self.latest = Some((new, old, s.readonly));
        }
    }

    /// A dirty-log call was made: the latest slot request is complete.
    pub fn dirty_log_call(&mut self) {
        self.latest = None;
    }

    /// Whether a recorded MMIO access at `gpa` (a store if `write`) that the replay's MMU
    /// found RAM may have raced the latest request.
    pub fn may_have_raced(&self, gpa: u64, write: bool) -> bool {
        let inside = |(start, end): Range| (start..end).contains(&gpa);
        self.multi_vcpu
            && self.latest.is_some_and(|(new, old, readonly)| {
                inside(new) && !old.is_some_and(inside) && !(write && readonly)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: u16, gpa: u64, size: u64, readonly: bool) -> SlotEvent {
        SlotEvent { as_id: 0, id, dirty_log: false, readonly, gpa, size, uaddr: 0x7f00_0000_0000 }
    }

    #[test]
    fn only_the_latest_request_of_a_multi_vcpu_trace_opens_a_window() {
        let mut w = InFlight::new(Some(2));
        assert!(!w.may_have_raced(0x1000, false), "no request yet");
        w.slot(&slot(1, 0x1000, 0x2000, false));
        assert!(w.may_have_raced(0x1000, false) && w.may_have_raced(0x2fff, true));
        assert!(!w.may_have_raced(0x3000, false), "outside the request");
        w.slot(&slot(2, 0x8000, 0x1000, true));
        assert!(!w.may_have_raced(0x1000, false), "the next request closed the first's window");
        assert!(w.may_have_raced(0x8000, false));
        assert!(!w.may_have_raced(0x8000, true), "a store to a read-only slot exits anyway");
        w.dirty_log_call();
        assert!(!w.may_have_raced(0x8000, false), "a dirty-log call closed the window");
        w.slot(&SlotEvent { dirty_log: true, ..slot(2, 0x8000, 0x1000, true) });
        assert!(!w.may_have_raced(0x8000, false), "a flags-only change makes nothing RAM");
        w.slot(&slot(1, 0x2000, 0x2000, false));
        assert!(w.may_have_raced(0x3000, false), "a move's new part");
        assert!(!w.may_have_raced(0x2000, false), "RAM before the move too");
        w.slot(&slot(2, 0x8000, 0x1000, false));
        w.slot(&slot(2, 0x8000, 0, false));
        assert!(!w.may_have_raced(0x8000, false), "a delete makes nothing RAM");
        w.slot(&SlotEvent { as_id: 1, ..slot(3, 0x1000, 0x1000, false) });
        assert!(!w.may_have_raced(0x1000, false), "address space 1 is not what accesses use");
        for threads in [Some(1), None] {
            let mut one = InFlight::new(threads);
            one.slot(&slot(1, 0x1000, 0x2000, false));
            assert!(!one.may_have_raced(0x1000, false), "{threads:?}: exact for one vCPU");
        }
    }
}
