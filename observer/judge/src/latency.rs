//! Accept latency over a sliding window: how long connections waited in containerd's
//! listener queue before containerd took them, as p50, p99 and max.
//!
//! Samples are kept exactly (bounded in number), so the percentiles are exact for the window;
//! at a few heartbeats a second plus real clients that is a few thousand samples at most.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Most samples kept; the oldest go first beyond this.
const MAX_SAMPLES: usize = 8192;

/// Percentiles of the samples in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

#[derive(Debug)]
pub struct LatencyWindow {
    window: Duration,
    samples: VecDeque<(Instant, Duration)>,
}

impl LatencyWindow {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn record(&mut self, at: Instant, latency: Duration) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, latency));
    }

    /// Summary of the samples no older than the window at `now`; `None` when there are none.
    pub fn summary(&mut self, now: Instant) -> Option<LatencySummary> {
        while let Some((at, _)) = self.samples.front() {
            if now.saturating_duration_since(*at) > self.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().map(|(_, l)| *l).collect();
        sorted.sort_unstable();
        Some(LatencySummary {
            count: sorted.len(),
            p50: nearest_rank(&sorted, 50),
            p99: nearest_rank(&sorted, 99),
            max: *sorted.last().expect("not empty"),
        })
    }
}

/// The nearest-rank percentile of sorted, non-empty samples.
fn nearest_rank(sorted: &[Duration], percent: usize) -> Duration {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_of_one_to_a_hundred() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(60));
        for i in (1..=100).rev() {
            w.record(t0, us(i));
        }
        let s = w.summary(t0).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, us(50));
        assert_eq!(s.p99, us(99));
        assert_eq!(s.max, us(100));
    }

    #[test]
    fn a_single_sample_is_every_percentile() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(60));
        w.record(t0, us(7));
        let s = w.summary(t0).unwrap();
        assert_eq!((s.p50, s.p99, s.max), (us(7), us(7), us(7)));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(10));
        w.record(t0, us(1000));
        w.record(t0 + Duration::from_secs(5), us(10));
        assert_eq!(
            w.summary(t0 + Duration::from_secs(9)).unwrap().max,
            us(1000)
        );
        let later = w.summary(t0 + Duration::from_secs(11)).unwrap();
        assert_eq!((later.count, later.max), (1, us(10)));
        assert_eq!(w.summary(t0 + Duration::from_secs(30)), None);
    }

    #[test]
    fn memory_is_bounded() {
        let t0 = Instant::now();
        let mut w = LatencyWindow::new(Duration::from_secs(60));
        for i in 0..(MAX_SAMPLES as u64 + 100) {
            w.record(t0, us(i));
        }
        assert_eq!(w.summary(t0).unwrap().count, MAX_SAMPLES);
    }
}
