//! The agent's own health, as `/livez`, `/readyz` and systemd's watchdog see it.
//!
//! The main loop records a beat on every turn; the agent is live while the last beat is
//! recent. It is ready once its sensors have started (on eBPF or on their fallbacks) and its
//! first probe has finished, whatever that probe found: readiness says the observer watches,
//! not that containerd is well. It is not ready while it cannot reach systemd (it could not
//! restart anything) or while its configuration keeps it from watching containerd (a
//! `--socket` where containerd does not answer): in both, the node is not protected. Nor
//! while it is degraded: while its own limits (descriptors, memory) keep its probes from
//! reaching containerd, it does not watch.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// How long the main loop may go without a turn before the agent counts as not live. The
/// loop turns at least once a second (its status timer), and a turn may wait up to 2 s for
/// systemd.
pub const LIVENESS_DEADLINE: Duration = Duration::from_secs(5);

/// Shared between the main loop (which writes) and the HTTP handlers (which read).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds from `started` to the loop's last turn, plus one (0: no turn yet).
    last_beat_ms: AtomicU64,
    sensors_started: AtomicBool,
    first_probe_done: AtomicBool,
    bus_connected: AtomicBool,
    config_problem: Mutex<Option<String>>,
    /// Why the observer's own probes cannot reach containerd, while they cannot.
    degraded: Mutex<Option<String>>,
}

/// Why the agent is not ready, for `/readyz`'s 503 body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotReady {
    pub ready: bool,
    /// What it still waits for: `sensors`, `first_probe` and/or `systemd` (the bus to systemd
    /// is lost and being reconnected).
    pub waiting_for: Vec<&'static str>,
    /// A setting that keeps the observer from watching containerd, and how to fix it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_problem: Option<String>,
    /// Why the observer cannot do its work on its own account (out of descriptors or
    /// memory), while it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Self::starting_at(Instant::now())
    }

    fn starting_at(started: Instant) -> Arc<Self> {
        Arc::new(Self {
            started,
            last_beat_ms: AtomicU64::new(0),
            sensors_started: AtomicBool::new(false),
            first_probe_done: AtomicBool::new(false),
            bus_connected: AtomicBool::new(true),
            config_problem: Mutex::new(None),
            degraded: Mutex::new(None),
        })
    }

    /// The main loop turned at `now`.
    pub fn beat(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.started).as_millis() as u64;
        self.last_beat_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// Time since the loop's last turn; `None` before its first.
    pub fn since_last_beat(&self, now: Instant) -> Option<Duration> {
        match self.last_beat_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => {
                let at = self.started + Duration::from_millis(ms - 1);
                Some(now.saturating_duration_since(at))
            }
        }
    }

    /// Whether the loop turned within [`LIVENESS_DEADLINE`] of `now`.
    pub fn is_live(&self, now: Instant) -> bool {
        self.since_last_beat(now)
            .is_some_and(|d| d <= LIVENESS_DEADLINE)
    }

    pub fn sensors_started(&self) {
        self.sensors_started.store(true, Ordering::Relaxed);
    }

    pub fn probe_finished(&self) {
        self.first_probe_done.store(true, Ordering::Relaxed);
    }

    /// Whether the agent is connected to systemd over D-Bus.
    pub fn set_bus_connected(&self, connected: bool) {
        self.bus_connected.store(connected, Ordering::Relaxed);
    }

    /// A configuration problem that keeps the agent from watching containerd, or `None`.
    pub fn set_config_problem(&self, problem: Option<String>) {
        *self
            .config_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = problem;
    }

    /// Whether the sensors started and the first probe finished: the agent runs (what
    /// systemd's `READY=1` says), though it may not be ready to protect containerd.
    pub fn started(&self) -> bool {
        self.sensors_started.load(Ordering::Relaxed)
            && self.first_probe_done.load(Ordering::Relaxed)
    }

    /// The observer's own limits kept a probe from reaching containerd (`Some(why)`), or a
    /// probe reached it again (`None`).
    pub fn set_degraded(&self, why: Option<String>) {
        *self.degraded.lock().unwrap_or_else(PoisonError::into_inner) = why;
    }

    /// Why the observer is degraded, while it is.
    pub fn degraded(&self) -> Option<String> {
        self.degraded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `Ok` when ready; otherwise what the agent still waits for, or why it is degraded.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let mut waiting_for = Vec::new();
        if !self.sensors_started.load(Ordering::Relaxed) {
            waiting_for.push("sensors");
        }
        if !self.first_probe_done.load(Ordering::Relaxed) {
            waiting_for.push("first_probe");
        }
        if !self.bus_connected.load(Ordering::Relaxed) {
            waiting_for.push("systemd");
        }
        let config_problem = self
            .config_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let degraded = self.degraded();
        if waiting_for.is_empty() && config_problem.is_none() && degraded.is_none() {
            Ok(())
        } else {
            Err(NotReady {
                ready: false,
                waiting_for,
                config_problem,
                degraded,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_until_sensors_and_first_probe() {
        let health = Health::new();
        assert_eq!(
            health.readiness().unwrap_err().waiting_for,
            ["sensors", "first_probe"]
        );
        health.sensors_started();
        assert_eq!(health.readiness().unwrap_err().waiting_for, ["first_probe"]);
        health.probe_finished();
        assert_eq!(health.readiness(), Ok(()));
    }

    #[test]
    fn not_ready_without_systemd_or_with_a_config_problem() {
        let health = Health::new();
        health.sensors_started();
        health.probe_finished();
        health.set_bus_connected(false);
        assert_eq!(health.readiness().unwrap_err().waiting_for, ["systemd"]);
        assert!(health.started(), "still running, for systemd's READY=1");
        health.set_bus_connected(true);
        health.set_config_problem(Some("fix --socket".into()));
        let not_ready = health.readiness().unwrap_err();
        assert!(not_ready.waiting_for.is_empty());
        assert_eq!(not_ready.config_problem.as_deref(), Some("fix --socket"));
        health.set_config_problem(None);
        assert_eq!(health.readiness(), Ok(()));
    }

    #[test]
    fn not_ready_while_degraded_and_ready_again_after() {
        let health = Health::new();
        health.sensors_started();
        health.probe_finished();
        health.set_degraded(Some("EMFILE".into()));
        let not_ready = health.readiness().unwrap_err();
        assert_eq!(not_ready.degraded.as_deref(), Some("EMFILE"));
        assert!(not_ready.waiting_for.is_empty());
        health.set_degraded(None);
        assert_eq!(health.readiness(), Ok(()));
    }

    #[test]
    fn live_only_while_the_loop_turns() {
        let t0 = Instant::now();
        let health = Health::starting_at(t0);
        assert!(!health.is_live(t0), "no turn yet");
        health.beat(t0 + Duration::from_secs(1));
        assert!(health.is_live(t0 + Duration::from_secs(1)));
        assert!(health.is_live(t0 + Duration::from_secs(1) + LIVENESS_DEADLINE));
        assert!(!health.is_live(t0 + Duration::from_secs(2) + LIVENESS_DEADLINE));
        assert_eq!(
            health.since_last_beat(t0 + Duration::from_secs(3)),
            Some(Duration::from_secs(2))
        );
    }
}
