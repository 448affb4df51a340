//! Sampled timing of MMIO resolution: the time from a TLB miss (or, under shadow paging, from a
//! guest access) to the MMU's MMIO decision, which is what MMIO caching is meant to shorten.
//!
//! Reading the clock costs about as much as the fast path it measures (a vDSO `clock_gettime`
//! is 20-25 ns on the dev VM), and the machine cannot know before a translation whether it will
//! end as MMIO, so timing every translation put a tenth of the main job's time into the clock
//! and diluted every throughput ratio the job reports. So a [`Sampler`] times one translation in
//! [`TIME_ONE_IN`], whatever it turns out to be. The choice never depends on the outcome, so the
//! average over the timed MMIO translations estimates the average over all of them.
//!
//! A timed translation that took longer than [`OUTLIER_NS`] is counted as an outlier and left out
//! of the time: no MMU path takes that long, but a vCPU thread the host deschedules mid-exit
//! does, and one such sample in a run moved the average by more than caching does.
//!
//! Invariant: `timed + outliers <= count`, and `nanos` sums the timed translations only.

use std::time::Instant;

/// One translation in this many is timed.
pub const TIME_ONE_IN: u32 = 16;

/// A timed translation longer than this (nanoseconds) is an outlier: the thread was descheduled.
pub const OUTLIER_NS: u64 = 100_000;

/// MMIO resolution counts and the sampled time spent on them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioTiming {
    /// Accesses resolved as MMIO.
    pub count: u64,
    /// How many of them were timed (outliers not included).
    pub timed: u64,
    /// Nanoseconds spent on the timed ones, retries included.
    pub nanos: u64,
    /// Timed ones longer than [`OUTLIER_NS`], left out of `timed` and `nanos`.
    pub outliers: u64,
}

impl MmioTiming {
    /// Counts one access resolved as MMIO; `nanos` is its time if it was timed.
    #[inline]
    pub fn record(&mut self, nanos: Option<u64>) {
        self.count += 1;
        match nanos {
            Some(ns) if ns > OUTLIER_NS => self.outliers += 1,
            Some(ns) => {
                self.timed += 1;
                self.nanos += ns;
            }
            None => {}
        }
    }

    /// Adds `other`'s counts (another vCPU's) to these.
    pub fn add(&mut self, other: &MmioTiming) {
        self.count += other.count;
        self.timed += other.timed;
        self.nanos += other.nanos;
        self.outliers += other.outliers;
    }
}

/// Picks the translations to time: every [`TIME_ONE_IN`]th call of [`Sampler::start`].
#[derive(Clone, Debug, Default)]
pub struct Sampler(u32);

impl Sampler {
    /// The start time if this translation is to be timed.
    #[inline]
    pub fn start(&mut self) -> Option<Instant> {
        self.0 = self.0.wrapping_add(1);
        (self.0 % TIME_ONE_IN == 0).then(Instant::now)
    }
}

/// Nanoseconds since `started`, if the translation was timed.
#[inline]
pub fn elapsed_ns(started: Option<Instant>) -> Option<u64> {
    started.map(|t0| u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_n_calls_is_timed() {
        let mut s = Sampler::default();
        let timed = (0..TIME_ONE_IN * 10).filter(|_| s.start().is_some()).count();
        assert_eq!(timed, 10);
    }

    #[test]
    fn only_timed_accesses_add_time() {
        let mut t = MmioTiming::default();
        t.record(None);
        t.record(Some(40));
        t.record(None);
        t.record(Some(OUTLIER_NS + 1));
        let mut total = MmioTiming { count: 1, timed: 1, nanos: 10, outliers: 0 };
        total.add(&t);
        assert_eq!(total, MmioTiming { count: 5, timed: 2, nanos: 50, outliers: 1 });
    }
}
