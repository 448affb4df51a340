//! Measurement helpers: per-call medians from timed batches, latency percentiles of single
//! operations (hdrhistogram), and thread pinning.
//!
//! Micro paths are too short to time one call at a time (a clock read costs about as much), so
//! [`per_call`] times batches of calls and takes the median over batches of the per-call mean:
//! the median discards batches hit by an interrupt or a preemption. Paths whose times are
//! compared are timed in turns by [`Rounds`], so that the host changing speed during a run
//! (frequency, steal time: this shared VM's speed moves by 1.5x within minutes) moves every
//! compared path alike.

use hdrhistogram::Histogram;
use std::time::Instant;

/// Median and 99th percentile of something, in nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// The median.
    pub median: f64,
    /// The 99th percentile.
    pub p99: f64,
}

impl Summary {
    /// In microseconds.
    pub fn us(self) -> Summary {
        Summary { median: self.median / 1e3, p99: self.p99 / 1e3 }
    }
}

/// Times `batches` batches of `batch` calls of `f` and returns the per-call median and p99 over
/// batches (ns).
pub fn per_call(batches: usize, batch: usize, mut f: impl FnMut()) -> Summary {
    let batch = batch.max(1);
    // Warm up: caches, branch predictors, lazily touched memory.
    for _ in 0..batch {
        f();
    }
    let mut v: Vec<f64> = Vec::with_capacity(batches.max(1));
    for _ in 0..batches.max(1) {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        v.push(t.elapsed().as_nanos() as f64 / batch as f64);
    }
    v.sort_by(f64::total_cmp);
    Summary { median: quantile(&v, 0.5), p99: quantile(&v, 0.99) }
}

/// `N` paths timed in turns: each round times one batch of every path, after a few untimed calls
/// that warm the caches and branch predictors again for it. A ratio of two paths is the median,
/// over rounds, of the ratio of their batches in that round: both were timed within microseconds
/// of each other, at one host speed.
pub struct Rounds<const N: usize> {
    batch: usize,
    warm: usize,
    samples: [Vec<f64>; N],
}

impl<const N: usize> Rounds<N> {
    /// Room for `rounds` rounds of batches of `batch` calls, each batch preceded by `batch / 10`
    /// untimed calls.
    pub fn new(rounds: usize, batch: usize) -> Rounds<N> {
        let batch = batch.max(1);
        Rounds {
            batch,
            warm: (batch / 10).max(1),
            samples: std::array::from_fn(|_| Vec::with_capacity(rounds)),
        }
    }

    /// Times one batch of `f` as path `path` (after the untimed warm-up calls).
    #[inline]
    pub fn time(&mut self, path: usize, mut f: impl FnMut()) {
        for _ in 0..self.warm {
            f();
        }
        let t = Instant::now();
        for _ in 0..self.batch {
            f();
        }
        self.samples[path].push(t.elapsed().as_nanos() as f64 / self.batch as f64);
    }

    /// Calls made so far as path `path`, timed and untimed.
    pub fn calls(&self, path: usize) -> u64 {
        (self.samples[path].len() * (self.batch + self.warm)) as u64
    }

    /// Per-call median and p99 of path `path` over its batches (ns).
    pub fn summary(&self, path: usize) -> Summary {
        let mut v = self.samples[path].clone();
        v.sort_by(f64::total_cmp);
        Summary { median: quantile(&v, 0.5), p99: quantile(&v, 0.99) }
    }

    /// The median over rounds of path `a`'s time divided by path `b`'s in the same round; 0 if
    /// no round timed both.
    pub fn ratio(&self, a: usize, b: usize) -> f64 {
        let mut v: Vec<f64> = self.samples[a]
            .iter()
            .zip(&self.samples[b])
            .filter(|(_, &y)| y > 0.0)
            .map(|(x, y)| x / y)
            .collect();
        v.sort_by(f64::total_cmp);
        quantile(&v, 0.5)
    }
}

/// The `q` quantile of sorted `v` (nearest rank); 0 for an empty slice.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Latencies of single operations, in nanoseconds.
#[derive(Debug)]
pub struct Latencies {
    h: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty record (1 ns .. 100 s, 3 significant digits).
    pub fn new() -> Latencies {
        // The bounds are constants that hdrhistogram accepts; fall back to auto-resizing.
        let h = Histogram::new_with_bounds(1, 100_000_000_000, 3)
            .or_else(|_| Histogram::new(3))
            .unwrap_or_else(|_| unreachable!("hdrhistogram rejects 3 significant figures"));
        Latencies { h }
    }

    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.h.saturating_record(ns.max(1));
    }

    /// Times `f` once and records it; returns what `f` returned.
    pub fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.record(t.elapsed().as_nanos() as u64);
        r
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// Median and p99 (ns).
    pub fn summary(&self) -> Summary {
        Summary {
            median: self.h.value_at_quantile(0.5) as f64,
            p99: self.h.value_at_quantile(0.99) as f64,
        }
    }
}

/// Pins the calling thread to `cpu` (Linux); `Err` says why not.
pub fn pin(cpu: usize) -> Result<(), String> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        vmmu_kvm::bench::pin_current_thread(cpu)
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        Err(format!("pinning to cpu {cpu} is implemented for Linux x86-64 only"))
    }
}

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU busy helper threads go to: the second one if there is one.
pub fn helper_cpu() -> Option<usize> {
    (cpus() > 1).then_some(1)
}

/// The 1-minute load average (Linux `/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_latencies() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert_eq!(quantile(&v, 0.99), 4.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        let mut l = Latencies::new();
        for ns in 1..=100 {
            l.record(ns * 1000);
        }
        let s = l.summary();
        assert!((49_000.0..=51_000.0).contains(&s.median), "{s:?}");
        assert!(s.p99 >= 98_000.0);
        let mut n = 0;
        let s = per_call(3, 10, || n += 1);
        assert_eq!(n, 40);
        assert!(s.median >= 0.0);
    }

    #[test]
    fn rounds_pair_the_batches_of_one_round() {
        let mut r = Rounds::<2>::new(3, 20);
        let (mut a, mut b) = (0, 0);
        for _ in 0..3 {
            r.time(0, || a += 1);
            r.time(1, || b += 1);
        }
        // 20 timed and 2 untimed calls per batch.
        assert_eq!((a, b), (66, 66));
        assert_eq!((r.calls(0), r.calls(1)), (66, 66));
        // The ratio pairs round i of one path with round i of the other.
        r.samples = [vec![1.0, 10.0, 100.0], vec![2.0, 20.0, 200.0]];
        assert_eq!(r.ratio(0, 1), 0.5);
        assert_eq!(r.ratio(1, 0), 2.0);
        assert_eq!(r.summary(0).median, 10.0);
        r.samples[1].clear();
        assert_eq!(r.ratio(0, 1), 0.0);
    }
}
