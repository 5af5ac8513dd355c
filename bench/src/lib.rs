//! Shared pieces of the demo and the benchmarks: statistics and TSC calibration.

use std::time::{Duration, Instant};

/// Summary of a sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Smallest value.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

/// Summarises `values` (any unit).
pub fn summarize(values: &[f64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |percent: usize| v[(percent * v.len()).div_ceil(100).clamp(1, v.len()) - 1];
    Summary { n: v.len(), min: v[0], median: rank(50), p99: rank(99), max: v[v.len() - 1] }
}

/// The host TSC rate in ticks per microsecond (guest TSC ticks at the same rate on one host).
pub fn tsc_ticks_per_us() -> f64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    (t1 - t0) as f64 / start.elapsed().as_secs_f64() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!((s.min, s.median, s.p99, s.max), (1.0, 50.0, 99.0, 100.0));
        assert_eq!(summarize(&[]).n, 0);
    }
}
