//! The restart budget: how often the actuator may restart containerd.
//!
//! A containerd that dies again right after each restart (a broken config, a full disk) must
//! not be restarted in a storm. Each restart doubles the wait before the next one may happen;
//! a long enough healthy stretch forgets the history; and past a cap within a window the
//! actuator gives up until containerd has been healthy for that long, or an operator
//! restarted it. One good probe lifts nothing. No I/O: `now` comes from the caller.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct BudgetConfig {
    /// Wait after the first restart before another may happen; doubled after each one.
    pub initial_backoff: Duration,
    /// The longest wait between two restarts.
    pub max_backoff: Duration,
    /// Restarts allowed within `window` before giving up.
    pub max_restarts: usize,
    pub window: Duration,
    /// Healthy time after which the restart history is forgotten.
    pub reset_after: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            max_restarts: 5,
            window: Duration::from_secs(1800),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// Whether a restart may happen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Allowance {
    Allowed,
    /// Too soon after the last restart.
    BackingOff {
        #[serde(serialize_with = "seconds")]
        retry_in: Duration,
    },
    /// Too many restarts within the window: no more until containerd has been healthy for
    /// `reset_after`, or an operator restarted it.
    GaveUp,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[derive(Debug)]
pub struct RestartBudget {
    config: BudgetConfig,
    restarts: VecDeque<Instant>,
    healthy_since: Option<Instant>,
    gave_up: bool,
}

impl RestartBudget {
    pub fn new(config: BudgetConfig) -> Self {
        Self {
            config,
            restarts: VecDeque::new(),
            healthy_since: None,
            gave_up: false,
        }
    }

    /// Whether a restart may happen at `now`.
    pub fn allowance(&mut self, now: Instant) -> Allowance {
        self.forget_old(now);
        if self.gave_up {
            return Allowance::GaveUp;
        }
        if self.restarts.len() >= self.config.max_restarts {
            self.gave_up = true;
            return Allowance::GaveUp;
        }
        match self.restarts.back() {
            Some(last) => {
                let wait = self.backoff();
                let since = now.saturating_duration_since(*last);
                if since >= wait {
                    Allowance::Allowed
                } else {
                    Allowance::BackingOff {
                        retry_in: wait - since,
                    }
                }
            }
            None => Allowance::Allowed,
        }
    }

    /// Records a restart at `now`.
    pub fn record_restart(&mut self, now: Instant) {
        self.restarts.push_back(now);
        self.healthy_since = None;
    }

    /// Tells the budget whether containerd is healthy at `now`. Only health sustained for
    /// `reset_after` forgets the restart history and lifts a give-up: a containerd that
    /// answers one probe between two crashes is still in its crash loop.
    pub fn observe_health(&mut self, now: Instant, healthy: bool) {
        if !healthy {
            self.healthy_since = None;
            return;
        }
        let since = *self.healthy_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.config.reset_after {
            self.restarts.clear();
            self.gave_up = false;
        }
    }

    /// An operator restarted containerd themselves (a new main process the observer did not
    /// cause): they took over, and the budget starts afresh.
    pub fn operator_restarted(&mut self) {
        self.restarts.clear();
        self.gave_up = false;
        self.healthy_since = None;
    }

    /// Restarts counted within the window.
    pub fn recent_restarts(&self) -> usize {
        self.restarts.len()
    }

    /// The wait required after the latest restart: doubles with each one in the window.
    fn backoff(&self) -> Duration {
        let doublings = self.restarts.len().saturating_sub(1).min(20) as u32;
        self.config
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.config.max_backoff)
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(first) = self.restarts.front() {
            if now.saturating_duration_since(*first) > self.config.window {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn budget() -> RestartBudget {
        RestartBudget::new(BudgetConfig {
            initial_backoff: s(10),
            max_backoff: s(60),
            max_restarts: 4,
            window: s(600),
            reset_after: s(120),
        })
    }

    #[test]
    fn the_first_restart_is_immediate() {
        let t0 = Instant::now();
        assert_eq!(budget().allowance(t0), Allowance::Allowed);
    }

    #[test]
    fn waits_double_after_each_restart_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(BudgetConfig {
            max_restarts: 100,
            ..budget().config
        });
        let mut t = t0;
        for expected in [10, 20, 40, 60, 60] {
            b.record_restart(t);
            assert_eq!(
                b.allowance(t + s(1)),
                Allowance::BackingOff {
                    retry_in: s(expected - 1)
                }
            );
            t += s(expected);
            assert_eq!(b.allowance(t), Allowance::Allowed);
        }
    }

    fn given_up(b: &mut RestartBudget, t0: Instant) -> Instant {
        let mut t = t0;
        for _ in 0..4 {
            assert_eq!(b.allowance(t), Allowance::Allowed);
            b.record_restart(t);
            t += s(61);
        }
        assert_eq!(b.allowance(t), Allowance::GaveUp);
        t
    }

    #[test]
    fn gives_up_after_the_cap_until_healthy_for_the_reset_period() {
        let t0 = Instant::now();
        let mut b = budget();
        let t = given_up(&mut b, t0);
        assert_eq!(b.allowance(t + s(30)), Allowance::GaveUp);
        b.observe_health(t + s(31), true);
        assert_eq!(b.allowance(t + s(32)), Allowance::GaveUp);
        b.observe_health(t + s(151), true);
        assert_eq!(b.allowance(t + s(152)), Allowance::Allowed);
        assert_eq!(b.recent_restarts(), 0);
    }

    #[test]
    fn one_good_probe_between_crashes_does_not_lift_a_give_up() {
        let t0 = Instant::now();
        let mut b = budget();
        let mut t = given_up(&mut b, t0);
        // Started again (by systemd, say), answers one probe, dies; for hours.
        for _ in 0..1000 {
            b.observe_health(t, true);
            t += s(5);
            b.observe_health(t, false);
            assert_eq!(b.allowance(t), Allowance::GaveUp);
            t += s(5);
        }
    }

    #[test]
    fn an_operators_restart_lifts_a_give_up() {
        let t0 = Instant::now();
        let mut b = budget();
        let t = given_up(&mut b, t0);
        b.operator_restarted();
        assert_eq!(b.allowance(t), Allowance::Allowed);
        assert_eq!(b.recent_restarts(), 0);
    }

    #[test]
    fn a_long_healthy_stretch_forgets_the_history() {
        let t0 = Instant::now();
        let mut b = budget();
        b.record_restart(t0);
        b.record_restart(t0 + s(10));
        b.observe_health(t0 + s(20), true);
        b.observe_health(t0 + s(100), true);
        assert_eq!(b.recent_restarts(), 2);
        b.observe_health(t0 + s(141), true);
        assert_eq!(b.recent_restarts(), 0);
        assert_eq!(b.allowance(t0 + s(142)), Allowance::Allowed);
    }

    #[test]
    fn flapping_health_does_not_reset_the_history() {
        let t0 = Instant::now();
        let mut b = budget();
        b.record_restart(t0);
        for i in 0..10 {
            b.observe_health(t0 + s(i * 30), i % 2 == 0);
        }
        assert_eq!(b.recent_restarts(), 1);
    }

    #[test]
    fn restarts_older_than_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut b = budget();
        for i in 0..3 {
            b.record_restart(t0 + s(i * 100));
        }
        assert_eq!(b.allowance(t0 + s(799)), Allowance::Allowed);
        assert_eq!(b.recent_restarts(), 1);
    }
}
