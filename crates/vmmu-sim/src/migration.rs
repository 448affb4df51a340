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
//! of exactly the bits the GET returned, as a VMM does before it copies the pages; with
//! "initially set" too (QEMU's mode), where a slot starts logging with every page dirty and
//! nothing write-protected, so the first collection reports every page and its CLEAR is what
//! protects (and splits) the mappings.
//!
//! # Migrations ([`Migration::new`] with `rounds`)
//! By default the slots are logged from their creation to the end of the run. With `rounds`,
//! the thread instead makes migration after migration, as a VMM that migrates a running VM
//! does: logging off for a while (vCPUs map and write freely, with huge leaves where the host
//! has huge pages); logging turned on by a flags-only update of every logged slot (the MMU
//! write-protects, and splits, what is mapped); `rounds` collections; then the phase is marked
//! ending, one final collection is made, and logging is turned off again (the MMU may map huge
//! pages again). `phase` (`SeqCst`, stored by the collector) counts these steps: odd while
//! logging is fully on, even otherwise. A write is an obligation only if the vCPU read the same
//! odd phase before the access and after it: logging was on before the write began and the
//! final collection of that migration had not begun when it ended, so the write's window ends at
//! that final collection at the latest (the vCPU reads `started` before the phase).

use crate::layout::RamRegion;
use crate::oracle::{OracleReport, Violation};
use crate::seam::{GuestMmu, SlotRequest};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
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
    /// As [`Self::Manual`], with `KVM_DIRTY_LOG_INITIALLY_SET` (QEMU's choice): a slot starts
    /// logging with every page dirty and its mappings left writable (huge ones too); each CLEAR
    /// protects, and splits, what it clears.
    InitiallySet,
}

impl DirtyLogMode {
    /// The core's mode.
    pub fn core(self) -> vmmu::dirty::DirtyLogMode {
        match self {
            DirtyLogMode::Auto => vmmu::dirty::DirtyLogMode::Auto,
            DirtyLogMode::Manual => vmmu::dirty::DirtyLogMode::Manual,
            DirtyLogMode::InitiallySet => vmmu::dirty::DirtyLogMode::InitiallySet,
        }
    }

    /// The name the report gives it.
    pub fn name(self) -> &'static str {
        match self {
            DirtyLogMode::Auto => "auto",
            DirtyLogMode::Manual => "manual",
            DirtyLogMode::InitiallySet => "initially-set",
        }
    }
}

/// What the dirty-log oracle did, for the report (`dirty_log` in the JSON form).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyLogReport {
    /// `auto`, `manual` or `initially-set`.
    pub mode: String,
    /// Collections made (GET, or GET + CLEAR, over every logged slot).
    pub collections: u64,
    /// Pages the collections reported, summed.
    pub pages_reported: u64,
    /// Write windows checked (one per page per vCPU per window).
    pub windows_checked: u64,
    /// Windows whose collections fell out of the history before they were handed over.
    pub unverifiable: u64,
    /// Times logging was turned on on live slots (migrations begun; 0 when the slots are logged
    /// from their creation).
    pub migrations: u64,
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
    /// Collections per migration; `None`: logged from creation to the end.
    rounds: Option<NonZeroU32>,
    slots: Vec<Logged>,
    started: AtomicU32,
    ended: AtomicU32,
    /// Odd while logging is fully on (module doc).
    phase: AtomicU32,
    handed: Mutex<Vec<Window>>,
}

/// What a vCPU read before an access ([`Recorder::before`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Before {
    ended: u32,
    phase: u32,
}

impl Migration {
    /// Dirty logging of the RAM `regions`: from their slots' creation (`rounds` `None`: the
    /// slots get `KVM_MEM_LOG_DIRTY_PAGES` when made), or in migrations of `rounds`
    /// collections each (module doc).
    pub fn new(
        mode: DirtyLogMode,
        regions: &[&RamRegion],
        rounds: Option<NonZeroU32>,
    ) -> Migration {
        let slots = regions
            .iter()
            .filter(|r| !r.readonly)
            .map(|r| Logged { slot: u32::from(r.slot), gpa: r.gpa, pages: r.size / PAGE_SIZE })
            .collect();
        Migration {
            mode,
            rounds,
            slots,
            started: AtomicU32::new(0),
            ended: AtomicU32::new(0),
            phase: AtomicU32::new(if rounds.is_none() { 1 } else { 0 }),
            handed: Mutex::new(Vec::new()),
        }
    }

    /// `request` with dirty logging on if it creates a logged slot that is logged from its
    /// creation.
    pub fn flag(&self, request: SlotRequest) -> SlotRequest {
        if self.rounds.is_none() && self.is_logged_create(&request) {
            SlotRequest { flags: request.flags | SlotRequest::LOG_DIRTY_PAGES, ..request }
        } else {
            request
        }
    }

    fn is_logged_create(&self, request: &SlotRequest) -> bool {
        self.slots.iter().any(|s| s.slot == request.slot) && request.memory_size != 0
    }

    fn logging_on(&self) -> bool {
        self.phase.load(Ordering::SeqCst) % 2 == 1
    }

    /// Whether `gpa` lies in a logged slot.
    fn logged(&self, gpa: Gpa) -> bool {
        self.slots.iter().any(|s| gpa.0.wrapping_sub(s.gpa.0) < s.pages * PAGE_SIZE)
    }

    /// Collections started so far (the machine's access budget may wait for some:
    /// `MachineConfig::min_collections`).
    pub fn collections_started(&self) -> u32 {
        self.started.load(Ordering::SeqCst)
    }

    /// A recorder for vCPU `vcpu`.
    pub fn recorder(&self, vcpu: usize) -> Recorder<'_> {
        Recorder { m: self, vcpu, lo: 0, hi: 0, gfns: HashSet::new() }
    }

    /// The collector's state.
    pub fn collector(&self) -> Collector<'_> {
        Collector {
            m: self,
            requests: Vec::new(),
            done_rounds: 0,
            history: HashMap::new(),
            pending: Vec::new(),
            report: OracleReport::default(),
            stats: DirtyLogReport { mode: self.mode.name().into(), ..DirtyLogReport::default() },
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
    /// Before an access: the logging phase, then the collections that ended before it began.
    #[inline]
    pub fn before(&self) -> Before {
        let phase = self.m.phase.load(Ordering::SeqCst);
        Before { ended: self.m.ended.load(Ordering::SeqCst), phase }
    }

    /// After a write to RAM at `gpa` that began when `before` returned `before`.
    pub fn wrote(&mut self, gpa: Gpa, before: Before) {
        if !self.m.logged(gpa) {
            return;
        }
        let lo = before.ended + 1;
        let hi = self.m.started.load(Ordering::SeqCst) + 1;
        if before.phase % 2 == 0 || self.m.phase.load(Ordering::SeqCst) != before.phase {
            return; // logging was not on for the whole write: no obligation
        }
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
    /// The logged slots' creating requests (without the logging flag), for migrations.
    requests: Vec<SlotRequest>,
    /// Collections made in the current migration.
    done_rounds: u32,
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
        mmu.set_dirty_log_mode(self.m.mode.core())
    }

    /// Notes a setup request: a logged slot's creation is kept for the migrations' flag
    /// updates.
    pub fn remember(&mut self, request: &SlotRequest) {
        if self.m.is_logged_create(request) {
            self.requests.push(*request);
        }
    }

    /// The migration thread's next step: a collection, or (in migrations) turning logging on
    /// or off (module doc). Sleeps a little after it.
    pub fn step<M: GuestMmu>(&mut self, mmu: &M) {
        let Some(rounds) = self.m.rounds else {
            self.collect(mmu);
            std::thread::sleep(PAUSE);
            return;
        };
        if !self.m.logging_on() {
            // Logging off: let the vCPUs run unlogged as long as a migration's collections take.
            std::thread::sleep(PAUSE * rounds.get());
            self.set_logging(mmu, true);
            self.m.phase.fetch_add(1, Ordering::SeqCst);
            self.stats.migrations += 1;
            self.done_rounds = 0;
        } else if self.done_rounds < rounds.get() {
            self.collect(mmu);
            self.done_rounds += 1;
            std::thread::sleep(PAUSE);
        } else {
            self.m.phase.fetch_add(1, Ordering::SeqCst);
            self.collect(mmu); // the final collection: every write of this migration is in it
            self.set_logging(mmu, false);
        }
    }

    /// Turns dirty logging on or off on every logged slot (flags-only updates).
    fn set_logging<M: GuestMmu>(&mut self, mmu: &M, on: bool) {
        for r in &self.requests {
            let flags = if on {
                r.flags | SlotRequest::LOG_DIRTY_PAGES
            } else {
                r.flags & !SlotRequest::LOG_DIRTY_PAGES
            };
            let request = SlotRequest { flags, ..*r };
            if let Err(e) = mmu.set_memory_region(&request) {
                self.report.push(Violation {
                    vcpu: None,
                    gpa: Some(format!("{:#x}", r.guest_phys_addr)),
                    what: format!(
                        "turning dirty logging {} on live slot {}",
                        if on { "on" } else { "off" },
                        r.slot
                    ),
                    expected: "ok".into(),
                    seen: e.to_string(),
                });
            }
        }
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
            if self.m.mode != DirtyLogMode::Auto {
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

    /// After the vCPUs stopped and handed their last windows over: one last collection (if
    /// logging is on) closes every window; returns the verdict and the numbers.
    pub fn finish<M: GuestMmu>(mut self, mmu: &M) -> (OracleReport, DirtyLogReport) {
        if self.m.logging_on() {
            self.collect(mmu);
        } else {
            // Every window closed at its migration's final collection at the latest.
            self.check(self.m.started.load(Ordering::SeqCst));
        }
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
    use crate::seam::{AccessKind, Translation};
    use std::collections::VecDeque;
    use vmmu::memslot::MemslotError;

    /// A recorded `KVM_CLEAR_DIRTY_LOG`: slot, first page, count, bitmap.
    type Clear = (u32, u64, u32, Option<Vec<u64>>);

    /// An MMU whose dirty logs the test scripts: each GET of a slot returns the next bitmap
    /// queued for it (an empty one when none is), and the mode it was put in, its CLEARs and
    /// its memslot updates are recorded. No vCPU runs on it.
    #[derive(Default)]
    struct Scripted {
        mode: Mutex<Option<vmmu::dirty::DirtyLogMode>>,
        gets: Mutex<HashMap<u32, VecDeque<Vec<u64>>>>,
        clears: Mutex<Vec<Clear>>,
        updates: Mutex<Vec<SlotRequest>>,
    }

    impl Scripted {
        /// Queues what the next GET of `slot` not yet scripted returns.
        fn then_get(&self, slot: u32, words: &[u64]) {
            self.gets.lock().unwrap().entry(slot).or_default().push_back(words.to_vec());
        }
    }

    impl GuestMmu for Scripted {
        type Vcpu = ();
        fn create_vcpu(&self, _index: usize) {}
        fn set_memory_region(&self, request: &SlotRequest) -> Result<(), MemslotError> {
            self.updates.lock().unwrap().push(*request);
            Ok(())
        }
        fn translate(&self, _: &mut (), _: Gpa, _: AccessKind) -> Translation {
            unreachable!("no vCPU runs on the scripted MMU")
        }
        fn set_dirty_log_mode(&self, mode: vmmu::dirty::DirtyLogMode) -> bool {
            *self.mode.lock().unwrap() = Some(mode);
            true
        }
        fn get_dirty_log(&self, slot: u32) -> Option<Result<Vec<u64>, String>> {
            let mut gets = self.gets.lock().unwrap();
            Some(Ok(gets.get_mut(&slot).and_then(VecDeque::pop_front).unwrap_or_default()))
        }
        fn clear_dirty_log(
            &self,
            slot: u32,
            first: u64,
            count: u32,
            bitmap: Option<&[u64]>,
        ) -> Option<Result<(), String>> {
            self.clears.lock().unwrap().push((slot, first, count, bitmap.map(<[u64]>::to_vec)));
            Some(Ok(()))
        }
    }

    fn region(slot: u16, gpa: u64, pages: u64) -> RamRegion {
        RamRegion { name: "r", slot, gpa: Gpa(gpa), size: pages * PAGE_SIZE, readonly: false }
    }

    #[test]
    fn a_write_must_be_in_its_window() {
        let r = region(1, 0x100_0000, 64);
        let m = Migration::new(DirtyLogMode::Auto, &[&r], None);
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
        // Outside the logged slots: no obligation, from the first byte past the slot's end
        // (a page of another, unlogged slot: `logged`'s `<` -> `<=` made it one).
        rec.wrote(Gpa(0x200_0000), rec.before());
        rec.wrote(Gpa(0x100_0000 + 64 * PAGE_SIZE), rec.before());
        assert!(rec.gfns.is_empty());
        rec.wrote(Gpa(0x100_0000 + 64 * PAGE_SIZE - 1), rec.before());
        assert_eq!(rec.gfns.len(), 1, "the slot's last byte is logged");
    }

    /// In migrations, only a write made wholly while logging was on is an obligation, and its
    /// window ends at its migration's final collection at the latest.
    #[test]
    fn in_migrations_only_writes_made_while_logging_is_on_count() {
        let r = region(1, 0x100_0000, 64);
        let m = Migration::new(DirtyLogMode::Auto, &[&r], NonZeroU32::new(2));
        let mut rec = m.recorder(0);
        let page = Gpa(0x100_3000);
        // Logging off (phase 0): no obligation.
        rec.wrote(page, rec.before());
        assert!(rec.gfns.is_empty());
        // Logging turned on while the write was in flight: no obligation either.
        let b = rec.before();
        m.phase.store(1, Ordering::SeqCst);
        rec.wrote(page, b);
        assert!(rec.gfns.is_empty());
        // Wholly inside the migration: an obligation, window [1, 1].
        rec.wrote(page, rec.before());
        assert_eq!((rec.lo, rec.hi, rec.gfns.len()), (1, 1, 1));
        // The final collection was marked while the write ran: no obligation (it may have
        // begun after that collection did).
        let b = rec.before();
        m.phase.store(2, Ordering::SeqCst);
        rec.wrote(Gpa(0x100_4000), b);
        assert_eq!(rec.gfns.len(), 1);
        // The slots are not flagged at creation: the migrations turn logging on.
        let req = SlotRequest {
            slot: 1,
            flags: 0,
            guest_phys_addr: 0x100_0000,
            memory_size: 0x4_0000,
            userspace_addr: 0,
        };
        assert_eq!(m.flag(req).flags, 0);
        let mut c = m.collector();
        c.remember(&req);
        c.remember(&SlotRequest { slot: 2, ..req });
        assert_eq!(c.requests, [req]);
    }

    #[test]
    fn logged_slots_get_the_flag() {
        let r = region(3, 0x100_0000, 4);
        let m = Migration::new(DirtyLogMode::Manual, &[&r], None);
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

    /// `--dirty-log manual` collects as a VMM with manual protect does: the MMU is put in manual
    /// mode, and each GET is followed by a CLEAR of exactly the bits it returned over the whole
    /// slot; `--dirty-log auto` leaves the MMU in auto mode and never CLEARs (its GET
    /// re-protects); `--dirty-log initially-set` collects as manual does, with the MMU in its
    /// "initially set" mode. The report names the mode. Kills `prepare -> true` (the MMU left
    /// in auto mode), `collect`'s `mode != Auto` -> `==` (a manual run that never exercised
    /// `KVM_CLEAR_DIRTY_LOG`, an auto run that did), and `collector`'s deleted `mode` field.
    #[test]
    fn manual_collections_clear_what_they_got_and_auto_ones_clear_nothing() {
        let r = region(1, 0x100_0000, 100);
        for (mode, name) in [
            (DirtyLogMode::Manual, "manual"),
            (DirtyLogMode::Auto, "auto"),
            (DirtyLogMode::InitiallySet, "initially-set"),
        ] {
            let m = Migration::new(mode, &[&r], None);
            let mmu = Scripted::default();
            let mut c = m.collector();
            assert!(c.prepare(&mmu));
            assert_eq!(*mmu.mode.lock().unwrap(), Some(mode.core()));
            mmu.then_get(1, &[0b1000, 1 << 35]);
            c.collect(&mmu);
            let clears = mmu.clears.lock().unwrap().clone();
            match mode {
                DirtyLogMode::Manual | DirtyLogMode::InitiallySet => {
                    assert_eq!(clears, [(1, 0, 100, Some(vec![0b1000, 1 << 35]))]);
                }
                DirtyLogMode::Auto => assert_eq!(clears, []),
            }
            let (report, stats) = c.finish(&mmu);
            assert_eq!((report.violations, stats.pages_reported), (0, 2));
            assert_eq!(stats.mode, name);
        }
    }

    /// A write must be reported by a collection of its window; a report by a later collection
    /// (the page was written again, or the MMU found it late) does not excuse it, even when the
    /// window is handed over after that collection. The window's collections are numbered as
    /// the vCPU saw them (the first collection is 1). Kills `check`'s `h.len() == HISTORY &&
    /// h[0] > w.lo` with `||` or `!=` (the late report made the window unverifiable: a lost
    /// dirty page let through).
    #[test]
    fn a_late_report_does_not_excuse_a_lost_page() {
        let r = region(1, 0x100_0000, 64);
        let m = Migration::new(DirtyLogMode::Auto, &[&r], None);
        let mmu = Scripted::default();
        let mut c = m.collector();
        let mut rec = m.recorder(0);
        c.collect(&mmu); // collection 1: nothing
        let b = rec.before();
        rec.wrote(Gpa(0x100_3000), b); // window [2, 2]
        mmu.then_get(1, &[]); // collection 2 misses the page
        mmu.then_get(1, &[0b1000]); // collection 3 reports it
        c.collect(&mmu);
        c.collect(&mmu);
        rec.hand_over();
        c.collect(&mmu);
        let (report, stats) = c.finish(&mmu);
        assert_eq!((report.violations, stats.unverifiable), (1, 0), "{report:?}");
        let v = report.first_violations[0].to_string();
        assert!(v.contains("collections 2..=2") && v.contains("[3]"), "{v}");
        assert_eq!(report.checked, stats.windows_checked);
    }

    /// A window handed over after its page was reported by [`HISTORY`] later collections can no
    /// longer be judged (the collection that should have reported it is forgotten): it is
    /// counted as unverifiable, not as a violation of a correct MMU, and the oracle's `checked`
    /// counts the windows judged. Kills `check`'s `h[0] > w.lo` -> `==` or `<` (a correct MMU
    /// blamed), the `unverifiable += 1` mutants, and `finish`'s `checked += windows_checked`
    /// -> `*=`.
    #[test]
    fn a_window_older_than_the_history_is_unverifiable() {
        let r = region(1, 0x100_0000, 64);
        let m = Migration::new(DirtyLogMode::Auto, &[&r], None);
        let mmu = Scripted::default();
        let mut c = m.collector();
        let mut rec = m.recorder(0);
        let b = rec.before();
        rec.wrote(Gpa(0x100_3000), b); // window [1, 1]
        for _ in 0..=HISTORY {
            mmu.then_get(1, &[0b1000]); // collections 1..=17 report it: 1 is forgotten
        }
        for _ in 0..=HISTORY {
            c.collect(&mmu);
        }
        assert_eq!(c.history[&0x1003], (2..=17).collect::<Vec<u32>>());
        rec.hand_over();
        let b = rec.before();
        rec.wrote(Gpa(0x100_5000), b); // window [18, 18], reported by 18
        rec.hand_over();
        mmu.then_get(1, &[0b10_0000]);
        c.collect(&mmu);
        let (report, stats) = c.finish(&mmu);
        assert_eq!(report.violations, 0, "{report:?}");
        assert_eq!((stats.windows_checked, stats.unverifiable), (2, 1));
        assert_eq!(report.checked, 2);
    }

    /// With `rounds`, a migration is: logging turned on (a flags-only update of each logged
    /// slot), `rounds` collections, a final collection, logging turned off; then the next one.
    /// Kills `step`'s `done_rounds < rounds` -> `<=` or `==` (a migration of one more
    /// collection, or of the final one only, than `--dirty-log-rounds` asks).
    #[test]
    fn a_migration_makes_its_rounds_then_one_final_collection() {
        let r = region(1, 0x100_0000, 64);
        let m = Migration::new(DirtyLogMode::Auto, &[&r], NonZeroU32::new(2));
        let mmu = Scripted::default();
        let mut c = m.collector();
        let req = SlotRequest {
            slot: 1,
            flags: 0,
            guest_phys_addr: 0x100_0000,
            memory_size: 0x4_0000,
            userspace_addr: 0x7000_0000,
        };
        c.remember(&req);
        let flags = |mmu: &Scripted| -> Vec<u32> {
            mmu.updates.lock().unwrap().iter().map(|u| u.flags).collect()
        };
        c.step(&mmu); // logging on
        assert_eq!(flags(&mmu), [SlotRequest::LOG_DIRTY_PAGES]);
        c.step(&mmu);
        c.step(&mmu);
        assert_eq!(m.started.load(Ordering::SeqCst), 2, "two rounds");
        assert_eq!(flags(&mmu), [SlotRequest::LOG_DIRTY_PAGES], "still logging");
        c.step(&mmu); // the final collection, then logging off
        assert_eq!(m.started.load(Ordering::SeqCst), 3);
        assert_eq!(flags(&mmu), [SlotRequest::LOG_DIRTY_PAGES, 0]);
        let (report, stats) = c.finish(&mmu);
        assert_eq!((report.violations, stats.collections, stats.migrations), (0, 3, 1));
    }
}
