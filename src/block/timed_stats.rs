//! Latency figures over fixed intervals (QEMU's `timed_stats`): for each
//! interval length a device is given (`stats-intervals`), the shortest,
//! longest and mean latency of reads, writes and flushes, and the mean
//! number of reads and writes in flight.
//!
//! Time is cut into periods of the interval's length. Each queue keeps two
//! windows (the current period and the one before), written only by its
//! own thread without a lock; a window is cleared when its thread first
//! counts into a new period. A query reports the last complete period (all
//! queues' windows for it added up), or the current one while none has
//! completed yet. The mean in-flight count is the sum of the latencies
//! counted in the period divided by its length.

use crate::qapi::BlockDeviceTimedStats;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which latencies a window keeps apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read = 0,
    Write = 1,
    Flush = 2,
}

#[derive(Default)]
struct Figures {
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

#[derive(Default)]
struct Window {
    /// The period this window holds, plus one (0: never used).
    period: AtomicU64,
    kinds: [Figures; 3],
}

/// One interval's windows in one queue.
pub struct Interval {
    len_ns: u64,
    windows: [Window; 2],
}

impl Interval {
    pub fn new(secs: u64) -> Self {
        Interval {
            len_ns: secs.saturating_mul(1_000_000_000).max(1),
            windows: Default::default(),
        }
    }

    /// Counts one request of `kind` that took `ns`, finishing at `now`
    /// (ns on the device's clock). Called by the queue's own thread only.
    pub fn account(&self, kind: Kind, ns: u64, now: u64) {
        let period = now / self.len_ns;
        let w = &self.windows[(period % 2) as usize];
        let tag = period + 1;
        if w.period.load(Ordering::Relaxed) != tag {
            for f in &w.kinds {
                f.count.store(0, Ordering::Relaxed);
                f.sum.store(0, Ordering::Relaxed);
                f.min.store(u64::MAX, Ordering::Relaxed);
                f.max.store(0, Ordering::Relaxed);
            }
            w.period.store(tag, Ordering::Release);
        }
        let f = &w.kinds[kind as usize];
        f.count.fetch_add(1, Ordering::Relaxed);
        f.sum.fetch_add(ns, Ordering::Relaxed);
        f.min.fetch_min(ns, Ordering::Relaxed);
        f.max.fetch_max(ns, Ordering::Relaxed);
    }
}

/// Adds up one interval over a device's queues, as of `now`.
pub fn report(queues: &[&Interval], now: u64) -> Option<BlockDeviceTimedStats> {
    let len = queues.first()?.len_ns;
    let current = now / len;
    let has = |p: u64| {
        queues
            .iter()
            .any(|q| q.windows[(p % 2) as usize].period.load(Ordering::Acquire) == p + 1)
    };
    let (period, elapsed) = if current > 0 && has(current - 1) {
        (current - 1, len)
    } else {
        (current, (now - current * len).max(1))
    };
    let mut totals = [(0u64, 0u64, u64::MAX, 0u64); 3];
    for q in queues {
        let w = &q.windows[(period % 2) as usize];
        if w.period.load(Ordering::Acquire) != period + 1 {
            continue;
        }
        for (t, f) in totals.iter_mut().zip(&w.kinds) {
            t.0 += f.count.load(Ordering::Relaxed);
            t.1 += f.sum.load(Ordering::Relaxed);
            t.2 = t.2.min(f.min.load(Ordering::Relaxed));
            t.3 = t.3.max(f.max.load(Ordering::Relaxed));
        }
    }
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let min = |t: &(u64, u64, u64, u64)| if t.0 == 0 { 0 } else { i(t.2) };
    let avg = |t: &(u64, u64, u64, u64)| t.1.checked_div(t.0).map_or(0, i);
    let depth = |t: &(u64, u64, u64, u64)| t.1 as f64 / elapsed as f64;
    let [rd, wr, fl] = totals;
    Some(BlockDeviceTimedStats {
        interval_length: i(len / 1_000_000_000),
        min_rd_latency_ns: min(&rd),
        max_rd_latency_ns: i(rd.3),
        avg_rd_latency_ns: avg(&rd),
        min_wr_latency_ns: min(&wr),
        max_wr_latency_ns: i(wr.3),
        avg_wr_latency_ns: avg(&wr),
        min_flush_latency_ns: min(&fl),
        max_flush_latency_ns: i(fl.3),
        avg_flush_latency_ns: avg(&fl),
        avg_rd_queue_depth: depth(&rd),
        avg_wr_queue_depth: depth(&wr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn the_last_complete_period_is_reported() {
        let a = Interval::new(1);
        let b = Interval::new(1);
        a.account(Kind::Read, 100, SEC / 2);
        b.account(Kind::Read, 300, SEC / 2);
        b.account(Kind::Write, 1000, SEC / 2);
        // Still in period 0: the current one, over half a second.
        let r = report(&[&a, &b], SEC / 2).unwrap();
        assert_eq!(
            (
                r.min_rd_latency_ns,
                r.max_rd_latency_ns,
                r.avg_rd_latency_ns
            ),
            (100, 300, 200)
        );
        assert_eq!(r.avg_wr_latency_ns, 1000);
        assert!((r.avg_rd_queue_depth - 400.0 / (SEC / 2) as f64).abs() < 1e-12);
        // In period 1, period 0 is complete and reported.
        a.account(Kind::Read, 7, SEC + 10);
        let r = report(&[&a, &b], SEC + 20).unwrap();
        assert_eq!(r.max_rd_latency_ns, 300);
        assert_eq!(r.interval_length, 1);
        // Two periods later the old window is stale: nothing to report.
        let r = report(&[&a, &b], 3 * SEC + 1).unwrap();
        assert_eq!((r.max_rd_latency_ns, r.avg_rd_latency_ns), (0, 0));
    }

    #[test]
    fn a_window_is_cleared_for_a_new_period() {
        let a = Interval::new(1);
        a.account(Kind::Flush, 50, 0);
        a.account(Kind::Flush, 60, 2 * SEC);
        let r = report(&[&a], 2 * SEC + 1).unwrap();
        assert_eq!((r.min_flush_latency_ns, r.max_flush_latency_ns), (60, 60));
    }
}
