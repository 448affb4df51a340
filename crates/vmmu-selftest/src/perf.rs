//! `memslot_perf_test`'s six tests: their constants, which test, memory sizes, parameters and
//! the outcome (the best of the runs).

use crate::PAGE;
use std::time::Duration;

/// The test memory's GPA.
pub const MEM_GPA: u64 = 0x1000_0000;
/// The first page after the sync page (the tests' memory proper).
pub const MEM_TEST_GPA: u64 = MEM_GPA + PAGE;
/// The full test memory (512 MiB + the sync page).
pub const MEM_SIZE: u64 = (512 << 20) + PAGE;
/// The map test's memory (32 MiB + the sync page).
pub const MEM_SIZE_MAP: u64 = (32 << 20) + PAGE;
/// The unmap tests' test area (128 MiB; the memory is one page more).
pub const MEM_TEST_UNMAP_SIZE: u64 = 128 << 20;
/// The unmap chunked test's chunk (2 MiB, in pages).
pub const MEM_TEST_UNMAP_CHUNK_PAGES: u64 = 512;
/// The move tests' window, in pages.
pub const MEM_TEST_MOVE_SIZE_PAGES: u64 = 50;
/// The value the guest writes.
pub const MEM_TEST_VAL_1: u64 = 0x1122_3344_5566_7788;
/// The value the host writes (RW test).
pub const MEM_TEST_VAL_2: u64 = 0x99AA_BBCC_DDEE_FF00;
/// The C test's default time per run.
pub const DEFAULT_SECONDS: f64 = 5.0;

/// One of the six tests (`-f`/`-e` 0..5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PerfTest {
    /// 0: map.
    Map,
    /// 1: unmap, 4 KiB at a time.
    Unmap,
    /// 2: unmap, 2 MiB at a time.
    UnmapChunked,
    /// 3: move the slot the guest is writing to.
    MoveActive,
    /// 4: move a slot the guest is not writing to.
    MoveInactive,
    /// 5: read/write every page from both sides.
    Rw,
}

impl PerfTest {
    /// In the C test's order.
    pub const ALL: [PerfTest; 6] = [
        PerfTest::Map,
        PerfTest::Unmap,
        PerfTest::UnmapChunked,
        PerfTest::MoveActive,
        PerfTest::MoveInactive,
        PerfTest::Rw,
    ];

    /// The C test's name.
    pub const fn name(self) -> &'static str {
        match self {
            PerfTest::Map => "map",
            PerfTest::Unmap => "unmap",
            PerfTest::UnmapChunked => "unmap chunked",
            PerfTest::MoveActive => "move active area",
            PerfTest::MoveInactive => "move inactive area",
            PerfTest::Rw => "RW",
        }
    }
}

/// How both sides cut the test memory into slots, as the C test does: one slot of the cap is
/// the guest's own, the other `nslots` tile the memory from [`MEM_GPA`], `pages_per_slot` pages
/// each and the rest in the last one. Test slots are numbered `1..=nslots`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    /// Test slots.
    pub nslots: u64,
    /// Pages of test memory (the sync page included).
    pub npages: u64,
    /// Pages of every slot but the last.
    pub pages_per_slot: u64,
}

/// Where the move tests move the last slot to, and what the guest may see meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveWindow {
    /// The GPA the last slot moves to and back from.
    pub base: u64,
    /// Move active area: the GPAs whose writes may exit as MMIO while the slot is away (the C
    /// test's `mmio_ok`); `None` for move inactive area.
    pub mmio: Option<core::ops::RangeInclusive<u64>>,
}

impl SlotLayout {
    /// The layout of `mempages` pages under a cap of `max` slots (the guest's own included).
    /// `Err` when no slot is left for the memory, or when the memory leaves slots without a
    /// page (the C test skips: [`crate::SelftestError::TooManySlots`]).
    pub fn new(max: u64, mempages: u64) -> crate::Result<SlotLayout> {
        if max <= 1 {
            return Err(crate::SelftestError::Setup("the slot cap must be above 1".into()));
        }
        let nslots = max - 1;
        let pages_per_slot = mempages / nslots;
        if pages_per_slot == 0 {
            return Err(crate::SelftestError::TooManySlots { max: mempages + 1 });
        }
        Ok(SlotLayout { nslots, npages: mempages, pages_per_slot })
    }

    /// The GPA test slot `k` (1-based) starts at in the layout.
    pub fn slot_gpa(&self, k: u64) -> u64 {
        MEM_GPA + (k - 1) * self.pages_per_slot * PAGE
    }

    /// The pages of test slot `k` (the last takes what the others leave).
    pub fn slot_pages(&self, k: u64) -> u64 {
        if k == self.nslots {
            self.npages - (k - 1) * self.pages_per_slot
        } else {
            self.pages_per_slot
        }
    }

    /// The GPA ranges `[start, end)` of the test pages `first..first + count`, cut at slot
    /// boundaries (the C test's unmap makes one `MADV_DONTNEED` per piece).
    pub fn pieces(&self, first: u64, count: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = MEM_TEST_GPA + (first + count) * PAGE;
        let mut gpa = MEM_TEST_GPA + first * PAGE;
        core::iter::from_fn(move || {
            if gpa >= end {
                return None;
            }
            let k = ((gpa - MEM_GPA) / PAGE / self.pages_per_slot + 1).min(self.nslots);
            let piece = (gpa, (self.slot_gpa(k) + self.slot_pages(k) * PAGE).min(end));
            gpa = piece.1;
            Some(piece)
        })
    }

    /// The move tests' window for `test` (`None` for the other tests): the last slot moves
    /// below itself by the window (move inactive area) or by half of it, so that the guest's
    /// writes to the slot's first half exit as MMIO meanwhile (move active area). `Err` when
    /// the layout has no room for it (the C test skips).
    pub fn move_window(&self, test: PerfTest) -> crate::Result<Option<MoveWindow>> {
        let active = match test {
            PerfTest::MoveActive => true,
            PerfTest::MoveInactive => false,
            _ => return Ok(None),
        };
        if self.nslots < 2 {
            return Err(crate::SelftestError::MoveNeedsTwoSlots);
        }
        let last = self.nslots;
        if active && self.slot_pages(last) < MEM_TEST_MOVE_SIZE_PAGES / 2 {
            return Err(crate::SelftestError::MoveSlotTooSmall { pages: self.slot_pages(last) });
        }
        let src = self.slot_gpa(last);
        let half = MEM_TEST_MOVE_SIZE_PAGES * PAGE / 2;
        Ok(Some(if active {
            MoveWindow { base: src - half, mmio: Some(src..=src + half - 1) }
        } else {
            MoveWindow { base: src - 2 * half, mmio: None }
        }))
    }
}

/// Memory sizes: the C test's, or scaled down by `2^shift` for quick runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// The full memory (sync page included).
    pub mem: u64,
    /// The map test's memory (sync page included).
    pub map: u64,
    /// The unmap tests' test area.
    pub unmap_test: u64,
}

impl Sizes {
    /// The C test's sizes.
    pub const FULL: Sizes =
        Sizes { mem: MEM_SIZE, map: MEM_SIZE_MAP, unmap_test: MEM_TEST_UNMAP_SIZE };

    /// Sizes divided by `2^shift` (at most 5: the unmap area stays a multiple of two chunks).
    pub fn scaled(shift: u32) -> Sizes {
        let s = shift.min(5);
        Sizes {
            mem: ((512 << 20) >> s) + PAGE,
            map: ((32 << 20) >> s) + PAGE,
            unmap_test: MEM_TEST_UNMAP_SIZE >> s,
        }
    }

    /// The memory of `t`, in pages (sync page included).
    pub fn pages(&self, t: PerfTest) -> u64 {
        match t {
            PerfTest::Map => self.map / PAGE,
            PerfTest::Unmap | PerfTest::UnmapChunked => self.unmap_test / PAGE + 1,
            _ => self.mem / PAGE,
        }
    }
}

/// The test's parameters (the C test's flags).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// `-s`: slot cap (`None`: the maximum, 32764).
    pub slots: Option<u32>,
    /// `-l`: seconds per run.
    pub seconds: f64,
    /// `-r`: runs (the best is reported).
    pub runs: u32,
    /// Memory sizes.
    pub sizes: Sizes,
}

impl Default for Params {
    /// The C test's defaults: no cap, 5 s, 1 run, full sizes.
    fn default() -> Self {
        Params { slots: None, seconds: DEFAULT_SECONDS, runs: 1, sizes: Sizes::FULL }
    }
}

/// The best of the runs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Slots in use (the guest's code slot included), as the C test counts them.
    pub slots: u32,
    /// Pages per test slot.
    pub pages_per_slot: u64,
    /// Best slot setup time (adding all slots).
    pub slot_setup: Duration,
    /// Iterations of the best run.
    pub iterations: u64,
    /// Best time per iteration (`None`: no full iteration; the C test only warns).
    pub per_iteration: Option<Duration>,
    /// MMIO exits the guest took (move active: expected ones).
    pub mmio_exits: u64,
}

/// What the host loop needs of a backend: the test memory as the host sees it, the last test
/// slot, and the sync page. Offsets are bytes from [`MEM_GPA`].
pub trait PerfHost {
    /// `MADV_DONTNEED` of `count` test pages from test page `first` (pages from
    /// [`MEM_TEST_GPA`]), one call per slot piece as the C test makes.
    fn unmap(&self, first: u64, count: u64) -> crate::Result<()>;
    /// The host's 8-byte load at `off`.
    fn load(&self, off: u64) -> crate::Result<u64>;
    /// The host's 8-byte store of `v` at `off`.
    fn store(&self, off: u64, v: u64) -> crate::Result<()>;
    /// `host_perform_sync`: lets the guest's next pass start and waits for it to end.
    fn perform_sync(&self) -> crate::Result<()>;
    /// Sets the last test slot (its own memory) at `gpa`; `None`: at its own place again.
    fn place_last_slot(&self, gpa: Option<u64>) -> crate::Result<()>;
}

/// The `-d` check: the host reads `want` at test page `page`, then zeroes it.
fn check(h: &impl PerfHost, page: u64, want: u64) -> crate::Result<()> {
    let off = MEM_TEST_GPA + page * PAGE - MEM_GPA;
    let v = h.load(off)?;
    if v != want {
        return Err(crate::SelftestError::Failed(format!(
            "guest written values should read back correctly before unmap ({v:#x} vs {want:#x} \
             @ gpa {:#x})",
            MEM_TEST_GPA + page * PAGE
        )));
    }
    h.store(off, 0)
}

/// One iteration of the C test's host loop for `test` over `pages` of memory
/// ([`Sizes::pages`], the sync page included).
pub fn host_loop(test: PerfTest, pages: u64, h: &impl PerfHost) -> crate::Result<()> {
    match test {
        PerfTest::Map => {
            let half = (pages - 1) / 2;
            h.unmap(half, half)?;
            h.perform_sync()?;
            check(h, 0, MEM_TEST_VAL_1)?;
            check(h, half - 1, MEM_TEST_VAL_1)?;
            h.unmap(0, half)?;
            h.perform_sync()?;
            check(h, half, MEM_TEST_VAL_2)?;
            check(h, 2 * half - 1, MEM_TEST_VAL_2)
        }
        PerfTest::Unmap | PerfTest::UnmapChunked => {
            let chunk = if test == PerfTest::Unmap { 1 } else { MEM_TEST_UNMAP_CHUNK_PAGES };
            let half = (pages - 1) / 2;
            h.perform_sync()?;
            check(h, 0, MEM_TEST_VAL_1)?;
            for c in (0..half).step_by(chunk as usize) {
                h.unmap(c, chunk)?;
            }
            h.perform_sync()?;
            check(h, half, MEM_TEST_VAL_2)?;
            for c in (half..2 * half).step_by(chunk as usize) {
                h.unmap(c, chunk)?;
            }
            Ok(())
        }
        PerfTest::MoveActive | PerfTest::MoveInactive => {
            h.place_last_slot(Some(MEM_GPA + pages * PAGE))?;
            h.place_last_slot(None)
        }
        PerfTest::Rw => {
            for page in 1..pages {
                h.store(page * PAGE + PAGE / 2, MEM_TEST_VAL_2)?;
            }
            h.perform_sync()?;
            for page in 1..pages {
                let off = page * PAGE;
                let v = h.load(off)?;
                if v != MEM_TEST_VAL_1 {
                    return Err(crate::SelftestError::Failed(format!(
                        "guest written values should read back correctly (is {v:#x} @ gpa {:#x})",
                        MEM_GPA + off
                    )));
                }
                h.store(off, 0)?;
            }
            h.perform_sync()
        }
    }
}

/// The C test's best of `runs` runs (at least one) of `once`: the run with the shortest time
/// per iteration (a run with a full iteration beats one without; the first run stands until a
/// better one comes), with the shortest slot setup of all runs. The first error ends it.
pub fn best_of(
    runs: u32,
    mut once: impl FnMut() -> crate::Result<Outcome>,
) -> crate::Result<Outcome> {
    let mut best: Option<Outcome> = None;
    for _ in 0..runs.max(1) {
        let o = once()?;
        best = Some(match best {
            None => o,
            Some(b) => {
                let better = match (b.per_iteration, o.per_iteration) {
                    (None, Some(_)) => true,
                    (Some(bt), Some(t)) => t < bt,
                    (_, None) => false,
                };
                let slot_setup = b.slot_setup.min(o.slot_setup);
                Outcome { slot_setup, ..if better { o } else { b } }
            }
        });
    }
    Ok(best.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_layout_tiles_the_memory_and_cuts_pieces_at_slot_edges() {
        // 3 test slots over 10 pages: 3, 3 and the last 4.
        let l = SlotLayout::new(4, 10).expect("room");
        assert_eq!((l.nslots, l.pages_per_slot), (3, 3));
        assert_eq!((l.slot_gpa(1), l.slot_gpa(3)), (MEM_GPA, MEM_GPA + 6 * PAGE));
        assert_eq!((l.slot_pages(2), l.slot_pages(3)), (3, 4));
        let total: u64 = (1..=l.nslots).map(|k| l.slot_pages(k)).sum();
        assert_eq!(total, 10, "the slots tile the memory");
        // Test pages 1..6 (gpa pages 2..7: the sync page is gpa page 0) span slots 1, 2 and 3.
        let pieces: Vec<_> = l.pieces(1, 5).collect();
        let at = |p: u64| MEM_GPA + p * PAGE;
        assert_eq!(pieces, vec![(at(2), at(3)), (at(3), at(6)), (at(6), at(7))]);
        assert_eq!(l.pieces(0, 0).count(), 0);
        assert!(matches!(SlotLayout::new(1, 10), Err(crate::SelftestError::Setup(_))));
        assert!(matches!(
            SlotLayout::new(12, 10),
            Err(crate::SelftestError::TooManySlots { max: 11 })
        ));
    }

    #[test]
    fn move_window_lies_below_the_last_slot() {
        let l = SlotLayout::new(3, 200).expect("room");
        let src = l.slot_gpa(2);
        let half = MEM_TEST_MOVE_SIZE_PAGES * PAGE / 2;
        let active = l.move_window(PerfTest::MoveActive).expect("room").expect("a move test");
        assert_eq!(active, MoveWindow { base: src - half, mmio: Some(src..=src + half - 1) });
        let inactive = l.move_window(PerfTest::MoveInactive).expect("room").expect("a move test");
        assert_eq!(inactive, MoveWindow { base: src - 2 * half, mmio: None });
        assert_eq!(l.move_window(PerfTest::Map).expect("not a move test"), None);
        let one = SlotLayout::new(2, 200).expect("room");
        assert!(matches!(
            one.move_window(PerfTest::MoveInactive),
            Err(crate::SelftestError::MoveNeedsTwoSlots)
        ));
        let small = SlotLayout::new(11, 200).expect("room"); // 10 slots of 20 pages
        assert!(matches!(
            small.move_window(PerfTest::MoveActive),
            Err(crate::SelftestError::MoveSlotTooSmall { pages: 20 })
        ));
    }

    #[test]
    fn sizes_scale_and_count_pages_as_the_c_test() {
        let f = Sizes::FULL;
        assert_eq!(f.pages(PerfTest::Map), 8193);
        assert_eq!(f.pages(PerfTest::Unmap), 32769);
        assert_eq!(f.pages(PerfTest::Rw), 131073);
        let q = Sizes::scaled(4);
        assert_eq!(q.pages(PerfTest::UnmapChunked), 2049);
        assert_eq!(Sizes::scaled(9), Sizes::scaled(5));
        assert_eq!((Sizes::scaled(5).unmap_test / PAGE) % (2 * MEM_TEST_UNMAP_CHUNK_PAGES), 0);
    }

    #[test]
    fn best_of_keeps_the_fastest_full_run_and_the_shortest_setup() {
        let ms = Duration::from_millis;
        let run = |setup, per: Option<u64>| Outcome {
            slot_setup: ms(setup),
            per_iteration: per.map(ms),
            iterations: 1,
            ..Outcome::default()
        };
        let mut runs =
            vec![run(5, None), run(7, Some(3)), run(2, Some(4)), run(9, None)].into_iter();
        let b = best_of(4, || Ok(runs.next().expect("4 runs"))).expect("no error");
        assert_eq!((b.per_iteration, b.slot_setup), (Some(ms(3)), ms(2)));
        let mut n = 0;
        let one = best_of(0, || {
            n += 1;
            Ok(run(1, None))
        });
        assert_eq!((one.map(|o| o.per_iteration), n), (Ok(None), 1), "at least one run");
        let failed = best_of(3, || Err(crate::SelftestError::Failed("x".into())));
        assert!(failed.is_err());
    }
}
