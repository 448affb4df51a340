//! A run's timeline, for reports people look at (`--report FILE.html`): cumulative counters
//! sampled at intervals (vCPU accesses, memslot updates, exits by MMIO path) and latency
//! histograms (memslot updates, MMIO handling), as plain data.
//!
//! The engines fill it only when asked (`MachineConfig::timeline`, the replay always, the churn
//! benchmark); rendering is the CLI's business. Samples are cumulative, so a reader gets the
//! per-interval counts by differencing neighbours ([`Timeline::rates`]) and a lost sample only
//! widens an interval.

use crate::seam::MmuExits;
use hdrhistogram::Histogram;

/// One sample: cumulative counts at `t_us` after the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Microseconds since the start (wall time for runs; recorded time for a replayed trace).
    pub t_us: u64,
    /// vCPU accesses so far (all vCPUs).
    pub accesses: u64,
    /// Memslot updates so far.
    pub updates: u64,
    /// Exits by kind and MMIO path so far (all vCPUs).
    pub exits: MmuExits,
}

/// One histogram bucket: `count` latencies in `low_ns..=high_ns`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Lowest latency of the bucket, nanoseconds.
    pub low_ns: u64,
    /// Highest latency of the bucket, nanoseconds.
    pub high_ns: u64,
    /// Latencies in it.
    pub count: u64,
}

/// A latency distribution: power-of-two buckets from 64 ns up, and its percentiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Non-empty and empty buckets between the first and the last non-empty one, in order.
    pub buckets: Vec<Bucket>,
    /// Latencies recorded.
    pub count: u64,
    /// Median, nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, nanoseconds.
    pub p99_ns: u64,
    /// Largest, nanoseconds.
    pub max_ns: u64,
}

/// The first bucket's upper bound: everything up to 64 ns lands in bucket 0.
const FIRST_BUCKET_NS: u64 = 64;

impl LatencyHistogram {
    /// The distribution in `h` (nanoseconds).
    pub fn of(h: &Histogram<u64>) -> LatencyHistogram {
        if h.is_empty() {
            return LatencyHistogram::default();
        }
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut low = 0;
        let mut high = FIRST_BUCKET_NS;
        // Cumulative counts, differenced: hdrhistogram's ranges are in equivalent-value steps,
        // so counting each bucket on its own would count a value at a boundary twice.
        let mut below = 0;
        loop {
            let upto = h.count_between(0, high);
            let count = upto.saturating_sub(below);
            below = upto;
            buckets.push(Bucket { low_ns: low, high_ns: high, count });
            if high >= h.max() {
                break;
            }
            low = high + 1;
            high = high.saturating_mul(2);
        }
        while buckets.first().is_some_and(|b| b.count == 0) {
            buckets.remove(0);
        }
        LatencyHistogram {
            buckets,
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p99_ns: h.value_at_quantile(0.99),
            max_ns: h.max(),
        }
    }

    /// The distribution of `ns` (nanoseconds).
    pub fn of_samples(ns: &[u64]) -> LatencyHistogram {
        let mut h = new_histogram();
        for &v in ns {
            h.saturating_record(v.max(1));
        }
        LatencyHistogram::of(&h)
    }
}

/// An empty latency histogram: 1 ns to 100 s, 3 significant digits (longer saturates).
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds hdrhistogram accepts; fall back to an auto-resizing one.
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("hdrhistogram rejects 3 significant figures"))
}

/// A run's samples and latency histograms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    /// What the time axis is (`wall time` or `recorded time`).
    pub clock: String,
    /// The sampling interval, microseconds.
    pub interval_us: u64,
    /// Cumulative samples, in time order; the first is at (or near) 0.
    pub samples: Vec<Sample>,
    /// Memslot update latency.
    pub update_latency: LatencyHistogram,
    /// MMIO handling latency (an access that ended as MMIO: walk, exit, the MMU's handling,
    /// the device or the exit to userspace).
    pub mmio_latency: LatencyHistogram,
}

/// Per-interval counts between two samples, as rates per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Middle of the interval, seconds since the start.
    pub t_s: f64,
    /// Interval length, seconds.
    pub dt_s: f64,
    /// Accesses per second.
    pub accesses: f64,
    /// Memslot updates in the interval (a count, not a rate: they come in bursts).
    pub updates: u64,
    /// MMIO SPTE hits per second.
    pub mmio_spte_hit: f64,
    /// Per-vCPU MMIO cache hits per second.
    pub mmio_cache_hit: f64,
    /// Slow-path MMIO per second.
    pub mmio_slow_path: f64,
    /// Violation exits per second.
    pub violation: f64,
}

impl Timeline {
    /// The sampling interval for a run of `duration`: 50 ms up to 100 s, then 2000 samples.
    pub fn interval_for(duration: std::time::Duration) -> std::time::Duration {
        let fifty = std::time::Duration::from_millis(50);
        (duration / 2000).max(fifty)
    }

    /// Per-interval rates between neighbouring samples (intervals of zero length are skipped).
    pub fn rates(&self) -> Vec<Rates> {
        self.samples
            .windows(2)
            .filter(|w| w[1].t_us > w[0].t_us)
            .map(|w| {
                let (a, b) = (&w[0], &w[1]);
                let dt = (b.t_us - a.t_us) as f64 / 1e6;
                let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
                Rates {
                    t_s: (a.t_us as f64 + b.t_us as f64) / 2e6,
                    dt_s: dt,
                    accesses: per(a.accesses, b.accesses),
                    updates: b.updates.saturating_sub(a.updates),
                    mmio_spte_hit: per(a.exits.mmio_spte_hit, b.exits.mmio_spte_hit),
                    mmio_cache_hit: per(a.exits.mmio_cache_hit, b.exits.mmio_cache_hit),
                    mmio_slow_path: per(a.exits.mmio_slow_path, b.exits.mmio_slow_path),
                    violation: per(a.exits.violation, b.exits.violation),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_sample_once() {
        let ns: Vec<u64> = (1..=1000).map(|i| i * 37).collect();
        let h = LatencyHistogram::of_samples(&ns);
        assert_eq!(h.count, 1000);
        assert_eq!(h.buckets.iter().map(|b| b.count).sum::<u64>(), 1000);
        assert!(h.buckets.windows(2).all(|w| w[1].low_ns == w[0].high_ns + 1));
        assert!(h.buckets.last().is_some_and(|b| b.high_ns >= h.max_ns));
        assert!(h.p50_ns <= h.p99_ns && h.p99_ns <= h.max_ns);
        assert_eq!(LatencyHistogram::of_samples(&[]), LatencyHistogram::default());
    }

    #[test]
    fn rates_difference_neighbours() {
        let s = |t_us, accesses, updates, hit| Sample {
            t_us,
            accesses,
            updates,
            exits: MmuExits { mmio_spte_hit: hit, ..MmuExits::default() },
        };
        let t = Timeline {
            samples: vec![s(0, 0, 0, 0), s(500_000, 1000, 3, 10), s(500_000, 1000, 3, 10)],
            ..Timeline::default()
        };
        let r = t.rates();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].accesses, r[0].updates, r[0].mmio_spte_hit), (2000.0, 3, 20.0));
        assert_eq!(Timeline::interval_for(std::time::Duration::from_secs(5)).as_millis(), 50);
        assert_eq!(Timeline::interval_for(std::time::Duration::from_secs(1000)).as_millis(), 500);
    }
}
