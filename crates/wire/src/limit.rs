//! Rate limiting of reports about a misbehaving peer.
//!
//! A hostile guest can make a violation per frame (a million a second): reporting each one
//! cost 2 GB of log in 20 s. A [`ReportLimit`] lets a few reports of each kind through per
//! interval and counts the rest; the count is then reported once ("N more suppressed").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Reports of one kind let through per interval by default.
pub const REPORTS_PER_INTERVAL: u32 = 3;
/// The default interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    reported: u32,
    suppressed: u64,
}

/// Per-kind report budget: at most `per_interval` reports of one kind in each `interval`.
#[derive(Debug, Clone)]
pub struct ReportLimit<K> {
    per_interval: u32,
    interval: Duration,
    windows: BTreeMap<K, Window>,
}

impl<K: Ord + Copy> ReportLimit<K> {
    /// At most `per_interval` reports of a kind per `interval`.
    pub fn new(per_interval: u32, interval: Duration) -> ReportLimit<K> {
        ReportLimit {
            per_interval,
            interval,
            windows: BTreeMap::new(),
        }
    }

    /// Whether a report of `kind` at `now` may go out. Returns `(report, suppressed)`:
    /// `suppressed` is the number of reports of this kind held back in the interval that just
    /// ended, to be reported (once) before this one.
    pub fn check(&mut self, kind: K, now: Instant) -> (bool, u64) {
        let w = self.windows.entry(kind).or_insert(Window {
            start: now,
            reported: 0,
            suppressed: 0,
        });
        let mut ended = 0;
        if now.duration_since(w.start) >= self.interval {
            ended = std::mem::take(&mut w.suppressed);
            w.start = now;
            w.reported = 0;
        }
        if w.reported < self.per_interval {
            w.reported += 1;
            (true, ended)
        } else {
            w.suppressed += 1;
            (false, ended)
        }
    }

    /// Ends the intervals that are over at `now`; returns the kinds that had reports held back,
    /// with their counts (each count is returned once).
    pub fn flush(&mut self, now: Instant) -> Vec<(K, u64)> {
        let interval = self.interval;
        let mut out = Vec::new();
        self.windows.retain(|kind, w| {
            if now.duration_since(w.start) < interval {
                return true;
            }
            if w.suppressed > 0 {
                out.push((*kind, w.suppressed));
            }
            false // A kind quiet for a whole interval starts afresh: nothing to keep.
        });
        out
    }

    /// When [`ReportLimit::flush`] has something to return, if ever.
    pub fn next_flush(&self) -> Option<Instant> {
        self.windows
            .values()
            .filter(|w| w.suppressed > 0)
            .map(|w| w.start + self.interval)
            .min()
    }
}

impl<K: Ord + Copy> Default for ReportLimit<K> {
    fn default() -> ReportLimit<K> {
        ReportLimit::new(REPORTS_PER_INTERVAL, REPORT_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_gives_a_few_reports_and_one_count_per_interval() {
        let t0 = Instant::now();
        let mut limit = ReportLimit::default();
        let mut reported = 0;
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 50); // 0.5 s
            let (report, suppressed) = limit.check("garbage", now);
            reported += u32::from(report);
            assert_eq!(suppressed, 0);
        }
        assert_eq!(reported, REPORTS_PER_INTERVAL);
        assert_eq!(limit.check("bad-ack", t0), (true, 0), "kinds are separate");
        assert_eq!(limit.next_flush(), Some(t0 + REPORT_INTERVAL));
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(limit.check("garbage", later), (true, 10_000 - 3));
        assert_eq!(limit.flush(later), Vec::new(), "already returned");
        limit.check("garbage", later);
        limit.check("garbage", later);
        limit.check("garbage", later); // The 4th in this interval: held back.
        assert_eq!(limit.flush(later + REPORT_INTERVAL), vec![("garbage", 1)]);
        assert_eq!(limit.next_flush(), None);
    }
}
