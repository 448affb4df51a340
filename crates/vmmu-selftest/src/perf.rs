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
