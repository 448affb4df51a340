//! Measurement helpers: per-call medians from timed batches, latency percentiles of single
//! operations (hdrhistogram), and thread pinning.
//!
//! Micro paths are too short to time one call at a time (a clock read costs about as much), so
//! [`per_call`] times batches of calls and takes the median over batches of the per-call mean:
//! the median discards batches hit by an interrupt or a preemption.

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
}
