//! The dirty-log oracle (`vmmu run --dirty-log`, issue 16 point 4): a migration-like thread
//! collects the dirty log of the RAM slots over and over while the vCPUs write, and every page a
//! vCPU wrote must be in a collection that could have seen the write, at the latest the first
//! one that started after the write completed. A page that misses it is a lost dirty page (a
//! migration would leave the destination with stale data): a violation naming the vCPU, the gpa
//! and the collections.
//!
//! # The windows
//! Collections are numbered from 1 and never overlap (one thread makes them). `started` counts
//! collections begun, `ended` collections finished (both `SeqCst`, stored by the collector, read
//! by vCPUs). A vCPU reads `ended` before an access (collections up to that number ended before
//! the write began: none of them can have seen it) and `started` after it (the next collection
//! starts after the write completed: it must see it, or an earlier one must have). So a write
//! gives a window `[lo, hi]` = `[ended_before + 1, started_after + 1]` of collections, one of
//! which must report its page. Both ends are conservative: a stall between the access and a
//! read only widens the window, never blames a correct MMU.
//!
//! # Bookkeeping
//! A vCPU keeps the pages it wrote in the current window (a set: repeated writes to one page in
//! one window are one obligation) and hands the set over when its window changes, and at the
//! end. The collector keeps, per page, the last [`HISTORY`] collections that reported it; after
//! each collection it checks every handed-over window that has closed (`hi` at most the
//! collections made). A window whose possible collections fell out of the history (a vCPU that
//! handed it over very late) is counted as unverifiable, never as a violation.
//!
//! In manual mode (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) a collection is a GET followed by a CLEAR
//! of exactly the bits the GET returned, as a VMM does before it copies the pages.

use crate::layout::RamRegion;
use crate::oracle::{OracleReport, Violation};
use crate::seam::{GuestMmu, SlotRequest};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use vmmu::types::{Gpa, PAGE_SIZE};

/// Collections remembered per page.
pub const HISTORY: usize = 16;

/// How `vmmu run --dirty-log` collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` clears and re-protects.
    Auto,
    /// GET, then `KVM_CLEAR_DIRTY_LOG` of the bits it returned (manual protect).
    Manual,
}

/// What the dirty-log oracle did, for the report (`dirty_log` in the JSON form).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyLogReport {
    /// `auto` or `manual`.
    pub mode: String,
    /// Collections made (GET, or GET + CLEAR, over every logged slot).
    pub collections: u64,
    /// Pages the collections reported, summed.
    pub pages_reported: u64,
    /// Write windows checked (one per page per vCPU per window).
    pub windows_checked: u64,
    /// Windows whose collections fell out of the history before they were handed over.
    pub unverifiable: u64,
}

/// One logged slot.
#[derive(Clone, Debug)]
struct Logged {
    slot: u32,
    gpa: Gpa,
    pages: u64,
}

/// Pages one vCPU wrote in one window.
struct Window {
    vcpu: usize,
    lo: u32,
    hi: u32,
    gfns: Vec<u64>,
}

/// The state shared by the vCPUs' recorders and the collector.
pub struct Migration {
    mode: DirtyLogMode,
    slots: Vec<Logged>,
    started: AtomicU32,
    ended: AtomicU32,
    handed: Mutex<Vec<Window>>,
}

impl Migration {
    /// Dirty logging of the RAM `regions` (their slots get `KVM_MEM_LOG_DIRTY_PAGES`).
    pub fn new(mode: DirtyLogMode, regions: &[&RamRegion]) -> Migration {
        let slots = regions
            .iter()
            .filter(|r| !r.readonly)
            .map(|r| Logged { slot: u32::from(r.slot), gpa: r.gpa, pages: r.size / PAGE_SIZE })
            .collect();
        Migration {
            mode,
            slots,
            started: AtomicU32::new(0),
            ended: AtomicU32::new(0),
            handed: Mutex::new(Vec::new()),
        }
    }

    /// `request` with dirty logging on if it creates a logged slot.
    pub fn flag(&self, request: SlotRequest) -> SlotRequest {
        if self.slots.iter().any(|s| s.slot == request.slot) && request.memory_size != 0 {
            SlotRequest { flags: request.flags | SlotRequest::LOG_DIRTY_PAGES, ..request }
        } else {
            request
        }
    }

    /// Whether `gpa` lies in a logged slot.
    fn logged(&self, gpa: Gpa) -> bool {
        self.slots.iter().any(|s| gpa.0.wrapping_sub(s.gpa.0) < s.pages * PAGE_SIZE)
    }

    /// A recorder for vCPU `vcpu`.
    pub fn recorder(&self, vcpu: usize) -> Recorder<'_> {
        Recorder { m: self, vcpu, lo: 0, hi: 0, gfns: HashSet::new() }
    }

    /// The collector's state.
    pub fn collector(&self) -> Collector<'_> {
        Collector {
            m: self,
            history: HashMap::new(),
            pending: Vec::new(),
            report: OracleReport::default(),
            stats: DirtyLogReport {
                mode: match self.mode {
                    DirtyLogMode::Auto => "auto".into(),
                    DirtyLogMode::Manual => "manual".into(),
                },
                ..DirtyLogReport::default()
            },
        }
    }
}

/// A vCPU's side: [`Recorder::before`] each access, [`Recorder::wrote`] after a RAM write.
pub struct Recorder<'m> {
    m: &'m Migration,
    vcpu: usize,
    lo: u32,
    hi: u32,
    gfns: HashSet<u64>,
}

impl Recorder<'_> {
    /// Before an access: the collections that ended before it began.
    #[inline]
    pub fn before(&self) -> u32 {
        self.m.ended.load(Ordering::SeqCst)
    }

    /// After a write to RAM at `gpa` that began when `before` returned `ended_before`.
    pub fn wrote(&mut self, gpa: Gpa, ended_before: u32) {
        if !self.m.logged(gpa) {
            return;
        }
        let lo = ended_before + 1;
        let hi = self.m.started.load(Ordering::SeqCst) + 1;
        if (lo, hi) != (self.lo, self.hi) {
            self.hand_over();
            (self.lo, self.hi) = (lo, hi);
        }
        self.gfns.insert(gpa.0 / PAGE_SIZE);
    }

    /// Hands the current window over to the collector (at a window change and at the end).
    pub fn hand_over(&mut self) {
        if self.gfns.is_empty() {
            return;
        }
        let gfns = self.gfns.drain().collect();
        let w = Window { vcpu: self.vcpu, lo: self.lo, hi: self.hi, gfns };
        self.m.handed.lock().unwrap_or_else(|e| e.into_inner()).push(w);
    }
}

/// The migration thread's side: collections and checks.
pub struct Collector<'m> {
    m: &'m Migration,
    /// Per gfn, the last collections that reported it (ascending).
    history: HashMap<u64, Vec<u32>>,
    pending: Vec<Window>,
    report: OracleReport,
    stats: DirtyLogReport,
}

impl Collector<'_> {
    /// Switches the MMU to the mode (before the logged slots exist). `false`: the MMU has no
    /// dirty logging.
    pub fn prepare<M: GuestMmu>(&self, mmu: &M) -> bool {
        mmu.set_dirty_log_manual(self.m.mode == DirtyLogMode::Manual)
    }

    /// One collection over every logged slot, then the checks of every closed window.
    pub fn collect<M: GuestMmu>(&mut self, mmu: &M) {
        let c = self.m.started.fetch_add(1, Ordering::SeqCst) + 1;
        for s in &self.m.slots {
            let words = match mmu.get_dirty_log(s.slot) {
                Some(Ok(w)) => w,
                Some(Err(errno)) => {
                    self.report.push(Violation {
                        vcpu: None,
                        gpa: Some(format!("{:#x}", s.gpa.0)),
                        what: format!("KVM_GET_DIRTY_LOG of logged slot {}", s.slot),
                        expected: "the dirty bitmap".into(),
                        seen: errno,
                    });
                    continue;
                }
                None => continue,
            };
            if self.m.mode == DirtyLogMode::Manual {
                let count = u32::try_from(s.pages).unwrap_or(u32::MAX);
                if let Some(Err(errno)) = mmu.clear_dirty_log(s.slot, 0, count, Some(&words)) {
                    self.report.push(Violation {
                        vcpu: None,
                        gpa: Some(format!("{:#x}", s.gpa.0)),
                        what: format!("KVM_CLEAR_DIRTY_LOG of logged slot {}", s.slot),
                        expected: "ok".into(),
                        seen: errno,
                    });
                }
            }
            let base = s.gpa.0 / PAGE_SIZE;
            for page in vmmu::dirty::pages_of(&words) {
                self.stats.pages_reported += 1;
                let h = self.history.entry(base + page).or_default();
                if h.len() == HISTORY {
                    h.remove(0);
                }
                h.push(c);
            }
        }
        self.m.ended.store(c, Ordering::SeqCst);
        self.stats.collections += 1;
        self.check(c);
    }

    /// Checks every handed-over window that closed by collection `c`.
    fn check(&mut self, c: u32) {
        let mut handed =
            std::mem::take(&mut *self.m.handed.lock().unwrap_or_else(|e| e.into_inner()));
        self.pending.append(&mut handed);
        let (closed, open): (Vec<Window>, Vec<Window>) =
            std::mem::take(&mut self.pending).into_iter().partition(|w| w.hi <= c);
        self.pending = open;
        for w in closed {
            for gfn in w.gfns {
                self.stats.windows_checked += 1;
                let h = self.history.get(&gfn).map(Vec::as_slice).unwrap_or(&[]);
                if h.iter().any(|&j| (w.lo..=w.hi).contains(&j)) {
                    continue;
                }
                if h.len() == HISTORY && h[0] > w.lo {
                    self.stats.unverifiable += 1;
                    continue;
                }
                self.report.push(Violation {
                    vcpu: Some(w.vcpu),
                    gpa: Some(format!("{:#x}", gfn * PAGE_SIZE)),
                    what: "a guest write to a dirty-logged page (lost dirty page)".into(),
                    expected: format!("the page in one of collections {}..={}", w.lo, w.hi),
                    seen: format!("reported by collections {h:?} only"),
                });
            }
        }
    }

    /// After the vCPUs stopped and handed their last windows over: one last collection closes
    /// every window; returns the verdict and the numbers.
    pub fn finish<M: GuestMmu>(mut self, mmu: &M) -> (OracleReport, DirtyLogReport) {
        self.collect(mmu);
        let left = self.pending.len();
        debug_assert_eq!(left, 0, "every window closes at the last collection");
        self.report.checked += self.stats.windows_checked;
        (self.report, self.stats)
    }
}

/// How long the migration thread waits between collections.
pub const PAUSE: Duration = Duration::from_micros(500);

#[cfg(test)]
mod tests {
    use super::*;

    fn region(slot: u16, gpa: u64, pages: u64) -> RamRegion {
        RamRegion { name: "r", slot, gpa: Gpa(gpa), size: pages * PAGE_SIZE, readonly: false }
    }

    #[test]
    fn a_write_must_be_in_its_window() {
        let r = region(1, 0x100_0000, 64);
        let m = Migration::new(DirtyLogMode::Auto, &[&r]);
        let mut c = m.collector();
        let mut rec = m.recorder(0);
        // A write before collection 1: window [1, 1].
        let b = rec.before();
        rec.wrote(Gpa(0x100_3000), b);
        rec.hand_over();
        // Collection 1 reports page 3: fine.
        c.history.insert(0x1003, vec![1]);
        m.started.store(1, Ordering::SeqCst);
        m.ended.store(1, Ordering::SeqCst);
        c.check(1);
        assert_eq!(c.report.violations, 0);
        // A write after collection 1, before 2: window [2, 2]; collection 2 misses it.
        let b = rec.before();
        rec.wrote(Gpa(0x100_3008), b);
        rec.hand_over();
        m.started.store(2, Ordering::SeqCst);
        m.ended.store(2, Ordering::SeqCst);
        c.check(2);
        assert_eq!(c.report.violations, 1, "{:?}", c.report.first_violations);
        assert!(c.report.first_violations[0].to_string().contains("lost dirty page"));
        // Outside the logged slots: no obligation.
        rec.wrote(Gpa(0x200_0000), rec.before());
        assert!(rec.gfns.is_empty());
    }

    #[test]
    fn logged_slots_get_the_flag() {
        let r = region(3, 0x100_0000, 4);
        let m = Migration::new(DirtyLogMode::Manual, &[&r]);
        let req = SlotRequest {
            slot: 3,
            flags: 0,
            guest_phys_addr: 0x100_0000,
            memory_size: 0x4000,
            userspace_addr: 0,
        };
        assert_eq!(m.flag(req).flags, SlotRequest::LOG_DIRTY_PAGES);
        assert_eq!(m.flag(SlotRequest { slot: 4, ..req }).flags, 0);
    }
}
