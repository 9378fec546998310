//! The detector: one state machine that turns observations into verdicts and decisions.
//!
//! It does no I/O and reads no clock: every call carries `now` from the caller, so its tests
//! run on a virtual clock. Sensors (the kernel programs, the `Version()` probe, systemd) feed
//! it [`Observation`]s; it answers with a [`Decision`] that the agent hands to the actuator.
//!
//! Rules:
//! - a kernel-reported exit of containerd's main process is a crash at once;
//! - a connection waiting in containerd's accept queue longer than `stall_threshold` is a
//!   kernel suspicion: containerd becomes suspect;
//! - a confirming probe is asked for once the oldest connection has waited half the stall
//!   threshold ([`DetectorConfig::confirm_after`]), so that its deadline runs alongside
//!   the threshold instead of after it;
//! - a failed probe while the suspicion stands is a hang;
//! - without kernel evidence, `failures_to_hang` consecutive failed probes make a hang
//!   (timeouts) or an unreachable containerd (connection refused, socket missing);
//! - a probe that answers, however slowly, makes containerd healthy: slow is not hung;
//! - until containerd has answered once, failed probes alone never make a restart: they
//!   could come from the observer's own configuration (a `--socket` where nothing listens,
//!   a permission error). Only evidence tied to containerd's process counts then: its exit,
//!   or a stall on a listener the kernel ties to its main process
//!   ([`Detector::set_listener_owned`]). [`Detector::unanswered`] tells the agent to report a
//!   configuration problem instead;
//! - while a restart is in flight, nothing triggers another one.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Tunables of the detector.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    /// Consecutive failed probes that make a hang or an unreachable containerd when there
    /// is no kernel evidence.
    pub failures_to_hang: u32,
    /// Age of the oldest pending connection from which the accept loop looks stalled.
    pub stall_threshold: Duration,
    /// Least time between two confirming probes asked for by kernel suspicion.
    pub confirm_spacing: Duration,
}

impl DetectorConfig {
    /// Age of the oldest pending connection from which a confirming probe is asked for: half
    /// the stall threshold, so that the probe's deadline runs alongside the threshold and a
    /// hang is judged about one deadline sooner. The verdict still needs the full threshold
    /// and a failed probe.
    pub fn confirm_after(&self) -> Duration {
        self.stall_threshold / 2
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            failures_to_hang: 3,
            stall_threshold: Duration::from_secs(1),
            confirm_spacing: Duration::from_secs(1),
        }
    }
}

/// Why a probe failed, as far as the detector cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeFailure {
    /// No answer within the deadline: containerd accepted or queued the call and sat on it.
    Timeout,
    /// Nobody listens on the socket (refused, or the socket file is missing).
    Refused,
    /// Any other error (a gRPC error status, a broken connection).
    Error,
}

/// Something a sensor saw.
#[derive(Debug, Clone)]
pub enum Observation {
    ProbeSucceeded {
        latency: Duration,
        version: String,
    },
    ProbeFailed {
        /// When the failed probe started: the first moment containerd did not answer.
        started: Instant,
        failure: ProbeFailure,
        error: String,
    },
    /// containerd's main process exited.
    ProcessExited {
        pid: u32,
        /// When it exited, as exactly as the sensor knows.
        at: Instant,
        sensor: Source,
        detail: String,
    },
    /// The actuator started a restart.
    RestartStarted,
    /// The restart job finished, with systemd's result.
    RestartFinished {
        ok: bool,
    },
    /// systemd reports the unit stopped on purpose (by an operator, or a clean exit).
    UnitStopped {
        detail: String,
    },
    /// The kernel's view of containerd's accept queue.
    Pending {
        count: u32,
        oldest_age: Option<Duration>,
        sensor: Source,
    },
}

/// Where a piece of evidence came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A kernel program (eBPF).
    Ebpf,
    /// The kernel's socket diagnostics (sock_diag), the accept queue without eBPF.
    SockDiag,
    /// A pidfd, process exits without eBPF.
    Pidfd,
    /// The `Version()` probe.
    Probe,
    /// systemd's view of the unit.
    Systemd,
}

/// One fact behind a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    pub source: Source,
    pub at: Instant,
    pub detail: String,
}

/// The detector's overall judgement of containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No probe has finished yet.
    Starting,
    Healthy,
    /// Something looks wrong but not enough to act.
    Suspect,
    Crashed,
    Hung,
    Unreachable,
    /// A restart is in flight or has finished and containerd has not answered yet.
    Recovering,
    /// An operator stopped the unit: nothing is restarted until it runs again.
    Stopped,
}

/// A judgement worth recording: what was seen, when, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub state: State,
    pub at: Instant,
    /// The first sign that led here; `at - first_sign` is the detection latency.
    pub first_sign: Instant,
    pub pid: Option<u32>,
    pub evidence: Vec<Evidence>,
}

impl Verdict {
    pub fn detection_latency(&self) -> Duration {
        self.at.saturating_duration_since(self.first_sign)
    }
}

/// What the agent should do after an observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait,
    /// Probe containerd now to confirm a kernel suspicion.
    ProbeNow,
    /// Restart containerd's unit because of this verdict.
    Restart(Verdict),
}

/// The state machine. Feed it with [`Detector::observe`].
#[derive(Debug)]
pub struct Detector {
    config: DetectorConfig,
    state: State,
    main_pid: Option<u32>,
    failed_probes: Vec<Evidence>,
    restart_in_flight: bool,
    /// Evidence of a stalled accept loop, while it stands.
    stall: Option<Evidence>,
    last_confirm: Option<Instant>,
    /// Whether containerd ever answered a probe on the configured socket.
    answered: bool,
    /// Whether the kernel ties the watched listener to containerd's main process.
    listener_owned: bool,
    /// Verdicts not yet taken by [`Detector::take_verdicts`].
    new_verdicts: Vec<Verdict>,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config,
            state: State::Starting,
            main_pid: None,
            failed_probes: Vec::new(),
            restart_in_flight: false,
            stall: None,
            last_confirm: None,
            answered: false,
            listener_owned: false,
            new_verdicts: Vec::new(),
        }
    }

    /// Tells the detector whether the listener whose queue it is shown belongs to
    /// containerd's main process, as the kernel sees it (the socket's inode among the
    /// process's file descriptors). Before containerd's first answer, only a stall on such a
    /// listener counts.
    pub fn set_listener_owned(&mut self, owned: bool) {
        self.listener_owned = owned;
    }

    /// Whether containerd has answered a probe yet.
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Probes failed often enough to act on, but containerd has never answered and nothing
    /// ties the failures to its process: the observer waits, and the agent reports a
    /// configuration problem.
    pub fn unanswered(&self) -> bool {
        !self.answered
            && self.failed_probes.len() as u32 >= self.config.failures_to_hang
            && !self.restart_in_flight
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Tells the detector which PID is containerd's main process now (from systemd).
    pub fn set_main_pid(&mut self, pid: Option<u32>) {
        self.main_pid = pid;
    }

    /// Verdicts reached since the last call, oldest first.
    pub fn take_verdicts(&mut self) -> Vec<Verdict> {
        std::mem::take(&mut self.new_verdicts)
    }

    pub fn observe(&mut self, now: Instant, observation: Observation) -> Decision {
        match observation {
            Observation::ProbeSucceeded { latency, version } => {
                self.failed_probes.clear();
                self.answered = true;
                if self.state != State::Healthy && !self.restart_in_flight {
                    let evidence = Evidence {
                        source: Source::Probe,
                        at: now,
                        detail: format!(
                            "Version() answered {version} in {:.1} ms",
                            latency.as_secs_f64() * 1e3
                        ),
                    };
                    self.record(now, State::Healthy, now, vec![evidence]);
                }
                Decision::Wait
            }
            Observation::ProbeFailed {
                started,
                failure,
                error,
            } => {
                self.failed_probes.push(Evidence {
                    source: Source::Probe,
                    at: started,
                    detail: format!("Version() failed ({}): {error}", failure_name(failure)),
                });
                if self.restart_in_flight || matches!(self.state, State::Crashed | State::Stopped) {
                    return Decision::Wait;
                }
                // Before containerd's first answer, a stall counts only on its own listener.
                let stall = self
                    .stall
                    .as_ref()
                    .filter(|_| self.answered || self.listener_owned);
                if let Some(stall) = stall
                    && failure != ProbeFailure::Refused
                {
                    let mut evidence = vec![stall.clone()];
                    evidence.push(self.failed_probes.last().expect("just pushed").clone());
                    let first = stall.at;
                    let verdict = self.record(now, State::Hung, first, evidence);
                    return Decision::Restart(verdict);
                }
                let failures = self.failed_probes.len() as u32;
                if failures < self.config.failures_to_hang || !self.answered {
                    if self.state != State::Suspect {
                        let first = self.failed_probes[0].at;
                        self.record(now, State::Suspect, first, self.failed_probes.clone());
                    }
                    return Decision::Wait;
                }
                let state = if failure == ProbeFailure::Refused {
                    State::Unreachable
                } else {
                    State::Hung
                };
                let first = self.failed_probes[0].at;
                let verdict = self.record(now, state, first, self.failed_probes.clone());
                Decision::Restart(verdict)
            }
            Observation::ProcessExited {
                pid,
                at,
                sensor,
                detail,
            } => {
                // Exits of other PIDs (an old main process we already restarted) and exits
                // caused by our own restart are expected.
                if self.main_pid.is_some_and(|main| main != pid) || self.restart_in_flight {
                    return Decision::Wait;
                }
                if matches!(self.state, State::Crashed | State::Stopped) {
                    return Decision::Wait;
                }
                let evidence = Evidence {
                    source: sensor,
                    at,
                    detail,
                };
                let verdict = self.record(now, State::Crashed, at, vec![evidence]);
                Decision::Restart(verdict)
            }
            Observation::Pending {
                count,
                oldest_age,
                sensor,
            } => {
                let Some(age) = oldest_age.filter(|age| *age >= self.config.confirm_after()) else {
                    self.stall = None;
                    return Decision::Wait;
                };
                if self.restart_in_flight || matches!(self.state, State::Crashed | State::Stopped) {
                    return Decision::Wait;
                }
                let queued = now.checked_sub(age).unwrap_or(now);
                if age < self.config.stall_threshold {
                    // Not a stall yet, but worth a probe whose deadline ends past the threshold.
                    self.stall = None;
                } else if self.stall.is_none() {
                    let evidence = Evidence {
                        source: sensor,
                        at: queued,
                        detail: format!(
                            "{count} connection(s) waiting in containerd's accept queue, the oldest for {:.0} ms",
                            age.as_secs_f64() * 1e3
                        ),
                    };
                    self.stall = Some(evidence.clone());
                    if matches!(self.state, State::Healthy | State::Starting) {
                        self.record(now, State::Suspect, queued, vec![evidence]);
                    }
                }
                let due = self.last_confirm.is_none_or(|t| {
                    now.saturating_duration_since(t) >= self.config.confirm_spacing
                });
                if due {
                    self.last_confirm = Some(now);
                    Decision::ProbeNow
                } else {
                    Decision::Wait
                }
            }
            Observation::UnitStopped { detail } => {
                self.restart_in_flight = false;
                self.stall = None;
                self.failed_probes.clear();
                if self.state != State::Stopped {
                    let evidence = Evidence {
                        source: Source::Systemd,
                        at: now,
                        detail,
                    };
                    self.record(now, State::Stopped, now, vec![evidence]);
                }
                Decision::Wait
            }
            Observation::RestartStarted => {
                self.restart_in_flight = true;
                self.stall = None;
                self.failed_probes.clear();
                self.state = State::Recovering;
                Decision::Wait
            }
            Observation::RestartFinished { ok } => {
                self.restart_in_flight = false;
                if !ok {
                    // The next failed probes will judge again.
                    self.state = State::Suspect;
                }
                Decision::Wait
            }
        }
    }

    fn record(
        &mut self,
        now: Instant,
        state: State,
        first_sign: Instant,
        evidence: Vec<Evidence>,
    ) -> Verdict {
        self.state = state;
        let verdict = Verdict {
            state,
            at: now,
            first_sign,
            pid: self.main_pid,
            evidence,
        };
        self.new_verdicts.push(verdict.clone());
        verdict
    }
}

fn failure_name(f: ProbeFailure) -> &'static str {
    match f {
        ProbeFailure::Timeout => "timeout",
        ProbeFailure::Refused => "refused",
        ProbeFailure::Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ok() -> Observation {
        Observation::ProbeSucceeded {
            latency: ms(2),
            version: "1.6.20".into(),
        }
    }

    fn failed(started: Instant, failure: ProbeFailure) -> Observation {
        Observation::ProbeFailed {
            started,
            failure,
            error: "x".into(),
        }
    }

    fn exit(pid: u32, at: Instant) -> Observation {
        Observation::ProcessExited {
            pid,
            at,
            sensor: Source::Ebpf,
            detail: "exited".into(),
        }
    }

    fn healthy_detector(t0: Instant) -> Detector {
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        assert_eq!(d.observe(t0, ok()), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
        d.take_verdicts();
        d
    }

    #[test]
    fn exit_of_main_process_is_a_crash_at_once() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let Decision::Restart(v) = d.observe(t0 + ms(1001), exit(100, t0 + ms(1000))) else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Crashed);
        assert_eq!(v.detection_latency(), ms(1));
        assert_eq!(v.evidence[0].source, Source::Ebpf);
        assert_eq!(d.state(), State::Crashed);
    }

    #[test]
    fn duplicate_exit_does_not_restart_twice() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert!(matches!(d.observe(t0, exit(100, t0)), Decision::Restart(_)));
        assert_eq!(d.observe(t0 + ms(1), exit(100, t0)), Decision::Wait);
    }

    #[test]
    fn exit_of_another_pid_is_ignored() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, exit(99, t0)), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn exit_during_our_restart_is_expected() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        assert_eq!(d.observe(t0 + ms(5), exit(100, t0 + ms(5))), Decision::Wait);
        assert_eq!(d.state(), State::Recovering);
    }

    #[test]
    fn repeated_timeouts_make_a_hang_with_all_the_evidence() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        let step = ms(2000);
        assert_eq!(
            d.observe(t0 + ms(1000), failed(t0, ProbeFailure::Timeout)),
            Decision::Wait
        );
        assert_eq!(d.state(), State::Suspect);
        assert_eq!(
            d.observe(
                t0 + step + ms(1000),
                failed(t0 + step, ProbeFailure::Timeout)
            ),
            Decision::Wait
        );
        let Decision::Restart(v) = d.observe(
            t0 + step * 2 + ms(1000),
            failed(t0 + step * 2, ProbeFailure::Timeout),
        ) else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(v.evidence.len(), 3);
        assert_eq!(v.detection_latency(), ms(5000));
    }

    #[test]
    fn refused_connections_make_containerd_unreachable() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..2 {
            d.observe(t0 + ms(i), failed(t0 + ms(i), ProbeFailure::Refused));
        }
        let Decision::Restart(v) = d.observe(t0 + ms(3), failed(t0 + ms(3), ProbeFailure::Refused))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Unreachable);
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..10 {
            let t = t0 + ms(i * 100);
            d.observe(t, failed(t, ProbeFailure::Timeout));
            d.observe(t, failed(t, ProbeFailure::Timeout));
            assert_eq!(d.observe(t, ok()), Decision::Wait);
        }
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn no_second_restart_while_one_is_in_flight() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        for i in 0..5 {
            let t = t0 + ms(i);
            assert_eq!(
                d.observe(t, failed(t, ProbeFailure::Refused)),
                Decision::Wait
            );
        }
        d.observe(t0 + ms(10), Observation::RestartFinished { ok: true });
        assert_eq!(d.state(), State::Recovering);
        d.observe(t0 + ms(20), ok());
        assert_eq!(d.state(), State::Healthy);
        let verdicts = d.take_verdicts();
        assert_eq!(verdicts.last().unwrap().state, State::Healthy);
    }

    #[test]
    fn a_failed_restart_lets_probes_judge_again() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        d.observe(t0, Observation::RestartFinished { ok: false });
        let mut decision = Decision::Wait;
        for i in 0..3 {
            let t = t0 + ms(i);
            decision = d.observe(t, failed(t, ProbeFailure::Refused));
        }
        assert!(matches!(decision, Decision::Restart(_)));
    }
    fn pending(age_ms: Option<u64>) -> Observation {
        Observation::Pending {
            count: age_ms.map_or(0, |_| 1),
            oldest_age: age_ms.map(ms),
            sensor: Source::Ebpf,
        }
    }

    #[test]
    fn a_stalled_accept_queue_asks_for_a_probe_at_once_and_makes_containerd_suspect() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, pending(Some(400))), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
        assert_eq!(
            d.observe(t0 + ms(600), pending(Some(1100))),
            Decision::ProbeNow
        );
        assert_eq!(d.state(), State::Suspect);
        let v = d.take_verdicts();
        assert_eq!(v[0].first_sign, t0 + ms(600) - ms(1100));
    }

    #[test]
    fn the_confirming_probe_leaves_at_half_the_threshold_without_suspicion() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, pending(Some(500))), Decision::ProbeNow);
        assert_eq!(d.state(), State::Healthy);
        assert!(d.take_verdicts().is_empty());
    }

    #[test]
    fn an_early_confirming_probe_that_fails_once_the_stall_stands_is_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // Queued at t0; the probe leaves at 500 ms, the stall stands from 1000 ms, the probe's
        // 1 s deadline passes at 1500 ms.
        assert_eq!(
            d.observe(t0 + ms(500), pending(Some(500))),
            Decision::ProbeNow
        );
        for age in (600..=1400).step_by(100) {
            assert!(!matches!(
                d.observe(t0 + ms(age), pending(Some(age))),
                Decision::Restart(_)
            ));
        }
        assert_eq!(d.state(), State::Suspect);
        let Decision::Restart(v) =
            d.observe(t0 + ms(1500), failed(t0 + ms(500), ProbeFailure::Timeout))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(v.detection_latency(), ms(1500));
    }

    #[test]
    fn a_probe_that_fails_before_the_stall_threshold_is_no_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(
            d.observe(t0 + ms(500), pending(Some(500))),
            Decision::ProbeNow
        );
        // A short deadline: the probe fails while the oldest connection is 800 ms old.
        assert_eq!(
            d.observe(t0 + ms(800), failed(t0 + ms(500), ProbeFailure::Timeout)),
            Decision::Wait
        );
        assert_ne!(d.state(), State::Hung);
    }

    #[test]
    fn kernel_suspicion_plus_one_failed_probe_is_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0 + ms(1200), pending(Some(1000)));
        let Decision::Restart(v) =
            d.observe(t0 + ms(2200), failed(t0 + ms(1200), ProbeFailure::Timeout))
        else {
            panic!("expected a restart");
        };
        assert_eq!(v.state, State::Hung);
        assert_eq!(v.evidence.len(), 2);
        assert_eq!(v.evidence[0].source, Source::Ebpf);
        assert_eq!(v.evidence[1].source, Source::Probe);
        assert_eq!(v.detection_latency(), ms(2000));
    }

    #[test]
    fn slow_is_not_hung() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        for i in 0..20 {
            let t = t0 + ms(i * 500);
            // The queue looks stalled, but every confirming probe answers, slowly.
            let decision = d.observe(t, pending(Some(1500)));
            assert!(!matches!(decision, Decision::Restart(_)));
            let decision = d.observe(
                t,
                Observation::ProbeSucceeded {
                    latency: ms(900),
                    version: "1.6.20".into(),
                },
            );
            assert_eq!(decision, Decision::Wait);
        }
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn confirming_probes_are_spaced() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        assert_eq!(d.observe(t0, pending(Some(1000))), Decision::ProbeNow);
        assert_eq!(d.observe(t0 + ms(100), pending(Some(1100))), Decision::Wait);
        assert_eq!(
            d.observe(t0 + ms(1000), pending(Some(2000))),
            Decision::ProbeNow
        );
    }

    #[test]
    fn a_drained_queue_clears_the_suspicion() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, pending(Some(1000)));
        d.observe(t0 + ms(100), pending(None));
        // Without the kernel evidence one failed probe is not enough.
        assert_eq!(
            d.observe(t0 + ms(200), failed(t0 + ms(200), ProbeFailure::Timeout)),
            Decision::Wait
        );
    }

    #[test]
    fn refused_probe_with_a_stale_queue_is_not_called_a_hang() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, pending(Some(1000)));
        assert_eq!(
            d.observe(t0 + ms(10), failed(t0, ProbeFailure::Refused)),
            Decision::Wait
        );
    }

    #[test]
    fn an_operator_stop_is_final_until_containerd_answers_again() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, exit(100, t0));
        d.observe(t0, Observation::RestartStarted);
        d.observe(
            t0 + ms(5),
            Observation::UnitStopped {
                detail: "inactive".into(),
            },
        );
        assert_eq!(d.state(), State::Stopped);
        for i in 0..10 {
            let t = t0 + ms(100 * i);
            assert_eq!(
                d.observe(t, failed(t, ProbeFailure::Refused)),
                Decision::Wait
            );
            assert_eq!(d.observe(t, pending(Some(5000))), Decision::Wait);
        }
        d.observe(t0 + ms(2000), ok());
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn late_exit_of_an_old_pid_after_recovery_is_ignored() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, exit(100, t0));
        d.observe(t0, Observation::RestartStarted);
        d.observe(t0, Observation::RestartFinished { ok: true });
        d.set_main_pid(Some(200));
        d.observe(t0 + ms(10), ok());
        assert_eq!(d.observe(t0 + ms(20), exit(100, t0)), Decision::Wait);
        assert_eq!(d.state(), State::Healthy);
    }

    #[test]
    fn probe_jitter_around_the_deadline_does_not_flap_into_a_restart() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        // Alternating late and timely answers: never three failures in a row.
        for i in 0..30u64 {
            let t = t0 + ms(i * 2000);
            let decision = if i % 3 == 2 {
                d.observe(t, ok())
            } else {
                d.observe(t, failed(t, ProbeFailure::Timeout))
            };
            assert!(!matches!(decision, Decision::Restart(_)), "restart at {i}");
        }
    }

    #[test]
    fn pending_connections_during_a_restart_are_ignored() {
        let t0 = Instant::now();
        let mut d = healthy_detector(t0);
        d.observe(t0, Observation::RestartStarted);
        assert_eq!(d.observe(t0, pending(Some(5000))), Decision::Wait);
        assert_eq!(d.state(), State::Recovering);
    }

    /// A detector that has never seen containerd answer (a wrong `--socket`, say).
    fn unanswered_detector() -> Detector {
        let mut d = Detector::new(DetectorConfig::default());
        d.set_main_pid(Some(100));
        d
    }

    #[test]
    fn failed_probes_alone_never_restart_a_containerd_never_seen_answer() {
        let t0 = Instant::now();
        for failure in [
            ProbeFailure::Refused,
            ProbeFailure::Timeout,
            ProbeFailure::Error,
        ] {
            let mut d = unanswered_detector();
            for i in 0..20u64 {
                let t = t0 + ms(i * 2000);
                assert_eq!(
                    d.observe(t, failed(t, failure)),
                    Decision::Wait,
                    "{failure:?}"
                );
            }
            assert!(
                d.unanswered(),
                "{failure:?}: reported as a configuration problem"
            );
            assert_eq!(d.state(), State::Suspect);
            // One answer later, the usual rules hold again.
            d.observe(t0 + ms(50_000), ok());
            assert!(!d.unanswered());
            let mut decision = Decision::Wait;
            for i in 0..3u64 {
                let t = t0 + ms(60_000 + i * 2000);
                decision = d.observe(t, failed(t, failure));
            }
            assert!(matches!(decision, Decision::Restart(_)), "{failure:?}");
        }
    }

    #[test]
    fn before_the_first_answer_an_exit_is_still_a_crash() {
        let t0 = Instant::now();
        let mut d = unanswered_detector();
        for i in 0..5u64 {
            d.observe(t0 + ms(i), failed(t0 + ms(i), ProbeFailure::Refused));
        }
        let Decision::Restart(v) = d.observe(t0 + ms(10), exit(100, t0 + ms(9))) else {
            panic!("an exit of the main process is evidence tied to the process");
        };
        assert_eq!(v.state, State::Crashed);
    }

    #[test]
    fn before_the_first_answer_only_a_stall_on_containerds_own_listener_counts() {
        let t0 = Instant::now();
        // A listener the kernel does not tie to containerd's process: no hang.
        let mut d = unanswered_detector();
        d.observe(t0, pending(Some(500)));
        d.observe(t0 + ms(600), pending(Some(1100)));
        assert_eq!(
            d.observe(t0 + ms(1500), failed(t0 + ms(500), ProbeFailure::Timeout)),
            Decision::Wait
        );
        // The same on containerd's own listener: a hang.
        let mut d = unanswered_detector();
        d.set_listener_owned(true);
        d.observe(t0, pending(Some(500)));
        d.observe(t0 + ms(600), pending(Some(1100)));
        let Decision::Restart(v) =
            d.observe(t0 + ms(1500), failed(t0 + ms(500), ProbeFailure::Timeout))
        else {
            panic!("a stall on containerd's own listener is evidence tied to the process");
        };
        assert_eq!(v.state, State::Hung);
    }
}
