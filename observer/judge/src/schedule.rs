//! The observer's own scheduling: did it run when it meant to?
//!
//! A paused VM, a node-wide stall or a throttled cgroup stops the observer as well as (or
//! instead of) containerd. Deadlines that expire while the observer is not running are not
//! containerd's doing. The agent reads two clocks at each turn of its loop and hands them
//! here; a turn that comes much later than the loop's longest sleep (a late tick), or a
//! `CLOCK_BOOTTIME` that ran ahead of `CLOCK_MONOTONIC` (the machine was suspended), is a
//! [`Gap`], which the detector is told of. No I/O: the readings come from the caller.

use std::time::{Duration, Instant};

/// The two clocks, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// `CLOCK_MONOTONIC` (what [`Instant`] is on Linux): stops while the machine is suspended.
    pub monotonic: Instant,
    /// `CLOCK_BOOTTIME`: runs on while the machine is suspended.
    pub boottime: Duration,
}

/// A stretch in which the observer did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The last turn before it and the first after, on the monotonic clock.
    pub from: Instant,
    pub to: Instant,
    /// How much later than the loop's longest sleep the turn came.
    pub late_by: Duration,
    /// How long the machine was suspended (`CLOCK_BOOTTIME` ahead of `CLOCK_MONOTONIC`).
    pub suspended: Duration,
}

impl Gap {
    /// How long the observer was away, whichever clock saw it.
    pub fn length(&self) -> Duration {
        self.to.saturating_duration_since(self.from) + self.suspended
    }
}

/// Watches the loop's turns for gaps.
#[derive(Debug)]
pub struct ScheduleWatch {
    longest_sleep: Duration,
    tolerance: Duration,
    last: Option<Reading>,
    gaps: u64,
    latest: Option<Gap>,
}

impl ScheduleWatch {
    /// `longest_sleep`: the longest the loop waits between two turns when it runs as meant
    /// to; `tolerance`: lateness beyond that still taken for ordinary jitter.
    pub fn new(longest_sleep: Duration, tolerance: Duration) -> Self {
        Self {
            longest_sleep,
            tolerance,
            last: None,
            gaps: 0,
            latest: None,
        }
    }

    /// One turn of the loop; a gap since the previous turn, if there was one.
    pub fn turn(&mut self, now: Reading) -> Option<Gap> {
        let last = self.last.replace(now)?;
        let monotonic = now.monotonic.saturating_duration_since(last.monotonic);
        let boottime = now.boottime.saturating_sub(last.boottime);
        let late_by = monotonic.saturating_sub(self.longest_sleep);
        let suspended = boottime.saturating_sub(monotonic);
        if late_by <= self.tolerance && suspended <= self.tolerance {
            return None;
        }
        let gap = Gap {
            from: last.monotonic,
            to: now.monotonic,
            late_by,
            suspended,
        };
        self.gaps += 1;
        self.latest = Some(gap);
        Some(gap)
    }

    /// The loop was busy on purpose until `now` (it awaited an answer): start measuring
    /// afresh from here, without judging the time since the last turn.
    pub fn resume(&mut self, now: Reading) {
        self.last = Some(now);
    }

    /// Gaps seen so far.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    pub fn latest(&self) -> Option<Gap> {
        self.latest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn at(t0: Instant, mono_ms: u64, boot_ms: u64) -> Reading {
        Reading {
            monotonic: t0 + ms(mono_ms),
            boottime: ms(10_000 + boot_ms),
        }
    }

    fn watch() -> ScheduleWatch {
        ScheduleWatch::new(ms(250), ms(500))
    }

    #[test]
    fn turns_on_time_and_ordinary_jitter_are_no_gap() {
        let t0 = Instant::now();
        let mut w = watch();
        for i in 0..100u64 {
            // Up to 700 ms late now and then: within the tolerance.
            let t = i * 250 + if i % 7 == 0 { 450 } else { 0 };
            assert_eq!(w.turn(at(t0, t, t)), None, "at {i}");
        }
        assert_eq!(w.gaps(), 0);
    }

    #[test]
    fn a_late_turn_is_a_gap_spanning_the_two_turns() {
        let t0 = Instant::now();
        let mut w = watch();
        w.turn(at(t0, 0, 0));
        w.turn(at(t0, 250, 250));
        // Stopped for 5 s (SIGSTOP, a throttled cgroup): both clocks ran on.
        let gap = w.turn(at(t0, 5250, 5250)).expect("a gap");
        assert_eq!(gap.from, t0 + ms(250));
        assert_eq!(gap.to, t0 + ms(5250));
        assert_eq!(gap.late_by, ms(4750));
        assert_eq!(gap.suspended, Duration::ZERO);
        assert_eq!(gap.length(), ms(5000));
        assert_eq!(w.gaps(), 1);
        assert_eq!(w.turn(at(t0, 5500, 5500)), None);
    }

    #[test]
    fn a_suspended_machine_shows_as_boottime_running_ahead() {
        let t0 = Instant::now();
        let mut w = watch();
        w.turn(at(t0, 0, 0));
        // The monotonic clock stood still for the 30 s of suspend; the turn itself was on time.
        let gap = w.turn(at(t0, 250, 30_250)).expect("a gap");
        assert_eq!(gap.late_by, Duration::ZERO);
        assert_eq!(gap.suspended, ms(30_000));
        assert_eq!(gap.length(), ms(30_250));
    }

    #[test]
    fn repeated_gaps_are_counted_and_the_latest_kept() {
        let t0 = Instant::now();
        let mut w = watch();
        let mut t = 0;
        w.turn(at(t0, t, t));
        for _ in 0..3 {
            t += 3000;
            assert!(w.turn(at(t0, t, t)).is_some());
            t += 250;
            assert!(w.turn(at(t0, t, t)).is_none());
        }
        assert_eq!(w.gaps(), 3);
        assert_eq!(w.latest().unwrap().to, t0 + ms(t - 250));
    }

    #[test]
    fn a_wait_the_loop_chose_is_no_gap() {
        let t0 = Instant::now();
        let mut w = watch();
        w.turn(at(t0, 0, 0));
        // The loop awaited systemd for 2 s, then went on.
        w.resume(at(t0, 2000, 2000));
        assert_eq!(w.turn(at(t0, 2250, 2250)), None);
        assert_eq!(w.gaps(), 0);
    }
}
