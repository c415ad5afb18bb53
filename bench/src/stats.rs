//! Numbers: the offset generator, latency percentiles, per-run figures and
//! the median over repetitions.

/// xorshift64* — a small, fast, deterministic generator so that both
/// backends see exactly the same offsets for the same seed.
#[derive(Clone, Debug)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        // A zero state would stay zero forever; splitmix-style scrambling
        // keeps neighbouring seeds apart as well.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        XorShift64 {
            state: if z == 0 { 0x2545_f491_4f6c_dd1d } else { z },
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`); the modulo bias is negligible for the
    /// block counts used here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest-rank method.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median of the values (mean of the two middle ones for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Geometric mean of positive values; `None` when there are none.
pub fn geomean(values: &[f64]) -> Option<f64> {
    let v: Vec<f64> = values
        .iter()
        .copied()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    if v.is_empty() {
        return None;
    }
    Some((v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp())
}

/// What one measured run produced, for one backend.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Requests completed inside the measurement window.
    pub requests: u64,
    /// Length of the measurement window in seconds.
    pub seconds: f64,
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Backend CPU time (user + system, all threads) during the window.
    pub cpu_s: f64,
    /// Backend CPU µs per request; numerically equal to CPU seconds per
    /// million requests.
    pub cpu_us_per_req: f64,
    /// Backend peak resident set size (VmHWM) at the end of the run.
    pub rss_mib: f64,
}

/// The metrics the reports show, in display order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Iops,
    MibS,
    P50,
    P99,
    CpuPerReq,
    Rss,
}

impl Metric {
    pub const ALL: [Metric; 6] = [
        Metric::Iops,
        Metric::MibS,
        Metric::P50,
        Metric::P99,
        Metric::CpuPerReq,
        Metric::Rss,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::MibS => "MiB/s",
            Metric::P50 => "p50 µs",
            Metric::P99 => "p99 µs",
            Metric::CpuPerReq => "CPU µs/req",
            Metric::Rss => "peak RSS MiB",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Metric::Iops => "iops",
            Metric::MibS => "mib_s",
            Metric::P50 => "p50_us",
            Metric::P99 => "p99_us",
            Metric::CpuPerReq => "cpu_us_per_req",
            Metric::Rss => "peak_rss_mib",
        }
    }

    pub fn of(self, r: &RunStats) -> f64 {
        match self {
            Metric::Iops => r.iops,
            Metric::MibS => r.mib_s,
            Metric::P50 => r.p50_us,
            Metric::P99 => r.p99_us,
            Metric::CpuPerReq => r.cpu_us_per_req,
            Metric::Rss => r.rss_mib,
        }
    }
}

/// Median of one metric over repetitions.
pub fn median_of(runs: &[RunStats], m: Metric) -> Option<f64> {
    median(&runs.iter().map(|r| m.of(r)).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_deterministic_and_spread() {
        let mut a = XorShift64::new(7);
        let mut b = XorShift64::new(7);
        let mut c = XorShift64::new(8);
        let va: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        let vc: Vec<u64> = (0..100).map(|_| c.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        let mut seen = [false; 16];
        let mut g = XorShift64::new(1);
        for _ in 0..1000 {
            seen[g.below(16) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_ne!(XorShift64::new(0).next_u64(), 0);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[5], 99.0), Some(5));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn medians_and_geomean() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
        let g = geomean(&[2.0, 8.0]).unwrap_or(0.0);
        assert!((g - 4.0).abs() < 1e-9);
        assert_eq!(geomean(&[0.0]), None);
    }
}
