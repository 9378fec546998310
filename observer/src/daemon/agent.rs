//! The agent's event loop: runs the sensors, feeds the detector, hands its decisions to the
//! actuator and keeps the status document current.
//!
//! Everything slow (probes, restarts) runs in its own task and reports back through a
//! channel, so a kernel event is never queued behind a hanging probe.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    act::restart::{self, ActuatorConfig, RestartOutcome},
    act::systemd::{Systemd, UnitStatus},
    config::Settings,
    daemon::health::Health,
    daemon::notify::Notifier,
    judge::budget::{Allowance, BudgetConfig, RestartBudget},
    judge::cause::{self, SignalRecord},
    judge::detector::{Decision, Detector, DetectorConfig, Observation, State, Verdict},
    judge::latency::LatencyWindow,
    judge::policy::{self, Action, Plan, Switches},
    report::metrics::{Metrics, state_label},
    report::status::{
        self, ActionRecord, BudgetRecord, Endpoint, ExitRecord, LatencyRecord, ObserverRecord,
        PendingRecord, ProbeRecord, RefreshRequest, RestartRecord, StatusDocument, VerdictRecord,
        WallClock, millis, push_action, push_bounded,
    },
    sense::kernel::{KernelAccept, KernelEvent, KernelExit},
    sense::probe::{self, ProbeResult},
    sense::sensors::Sensors,
};

/// What the actuator's task came back with.
struct ActionResult {
    plan: Plan,
    unit: UnitStatus,
    restart: Option<RestartOutcome>,
}

/// How often the accept queue is sampled while a connection waits in it.
const PENDING_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How often it is sampled while it was empty at the last sample. A connection that starts
/// waiting is then seen at most this old, well before it matters (the detector's
/// `confirm_after`, half the stall threshold: 500 ms by default); sampling every 100 ms only
/// while something waits is most of what the agent saves at rest.
const IDLE_PENDING_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// How often the unit is read from systemd while its change signals are followed (without
/// them: every probe interval).
const UNIT_REREAD_INTERVAL: Duration = Duration::from_secs(10);
/// Window of the accept-latency percentiles.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);
/// Recent signals kept to name an exit's cause.
const SIGNAL_HISTORY: usize = 64;
/// How long shutdown waits for a restart in flight to finish before recording it as
/// interrupted (systemd carries on with the job either way).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.status_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for the status endpoint; choose another with --status-listen",
                settings.status_listen
            )
        })?;
    let unix_listener = match &settings.status_socket {
        Some(path) => Some(status::bind_unix(path).with_context(|| {
            format!(
                "cannot serve the status endpoint on {}; choose another with --status-socket",
                path.display()
            )
        })?),
        None => None,
    };
    let health = Health::new();
    let metrics = Arc::new(Metrics::new());
    let mut notifier = Notifier::from_env();
    let systemd = Systemd::connect(&settings.bus, &settings.unit).await?;

    let (kernel_tx, mut kernel_rx) = mpsc::channel::<KernelEvent>(256);
    let mut sensors = Sensors::start(&settings, kernel_tx);
    health.sensors_started();
    let mode = if settings.no_ebpf {
        "polling_only"
    } else if sensors.ebpf_loaded() {
        "fused"
    } else {
        "fallback"
    };
    let detector = Detector::new(DetectorConfig {
        stall_threshold: settings.stall_threshold,
        failures_to_hang: settings.failures_to_hang,
        confirm_spacing: settings.probe_timeout,
    });
    let (status_tx, status_rx) = watch::channel(StatusDocument {
        observer: ObserverRecord::current(),
        state: detector.state(),
        unit: settings.unit.clone(),
        containerd_pid: None,
        containerd_version: None,
        mode,
        dry_run: settings.dry_run,
        sensors: sensors.record(true),
        last_probe: None,
        pending_connections: PendingRecord::default(),
        accept_latency: None,
        heartbeat: sensors.heartbeat(),
        last_exit: None,
        verdicts: Default::default(),
        restarts: Default::default(),
        actions: Default::default(),
        unit_state: UnitStatus::default(),
        restart_budget: BudgetRecord {
            allowance: Allowance::Allowed,
            recent_restarts: 0,
            max_restarts: budget_config(&settings).max_restarts,
            window_s: budget_config(&settings).window.as_secs_f64(),
        },
        paused: false,
    });
    let (refresh_tx, mut refresh_rx) = mpsc::channel::<RefreshRequest>(16);
    let endpoint = Endpoint {
        status: status_rx,
        health: health.clone(),
        metrics: metrics.clone(),
        refresh: refresh_tx,
    };
    let server = tokio::spawn(endpoint.serve(listener, unix_listener));
    crate::report::kubernetes::spawn(status_tx.subscribe(), settings.no_kubernetes);
    info!(
        status = %format!("http://{}/status", settings.status_listen),
        status_socket = ?settings.status_socket,
        watchdog = ?notifier.watchdog_every().map(|d| d * 2),
        unit = %settings.unit,
        socket = %settings.socket.display(),
        bus = %settings.bus,
        mode,
        "observer started"
    );

    let mut agent = Agent {
        settings: &settings,
        systemd,
        sensors,
        detector,
        status: status_tx,
        metrics,
        clock: WallClock::new(),
        main_pid: None,
        probes_in_flight: 0,
        restart_in_flight: None,
        latency: LatencyWindow::new(LATENCY_WINDOW),
        signals: VecDeque::new(),
        budget: RestartBudget::new(budget_config(&settings)),
        actuator: ActuatorConfig {
            kill_grace: settings.kill_grace,
            dump_stacks: settings.dump_stacks,
            ..ActuatorConfig::default()
        },
        deferred: None,
        unit_read_at: Instant::now(),
    };
    agent.refresh_unit().await;
    // systemd tells us at once when the unit changes (a new main PID after a restart by
    // systemd or an operator), so the sensors follow without waiting for the next tick.
    let mut unit_changes = match agent.systemd.unit_changes().await {
        Ok(stream) => Some(Box::pin(stream)),
        Err(e) => {
            warn!(
                "cannot follow the unit's changes as they happen ({e}); reading them every probe interval"
            );
            None
        }
    };

    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(4);
    let (restart_tx, mut restart_rx) = mpsc::channel::<ActionResult>(1);
    let mut probe_timer = tokio::time::interval(settings.probe_interval);
    probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `None` when no sensor watches the accept queue (probes only): no sampling at all.
    let mut next_pending_sample = agent.sensors.watches_queue().then(Instant::now);
    let mut status_timer = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    // The state last told to systemd; `None` until READY=1 was sent.
    let mut notified: Option<State> = None;

    loop {
        let decision = tokio::select! {
            _ = &mut shutdown => break,
            Some(event) = kernel_rx.recv() => agent.on_kernel_event(event).await,
            Some(result) = probe_rx.recv() => {
                health.probe_finished();
                agent.on_probe(result)
            }
            _ = sleep_until_or_never(next_pending_sample) => {
                let (decision, waiting) = agent.sample_pending();
                let interval = if waiting {
                    PENDING_SAMPLE_INTERVAL
                } else {
                    IDLE_PENDING_SAMPLE_INTERVAL
                };
                next_pending_sample = Some(Instant::now() + interval);
                if decision == Decision::ProbeNow {
                    agent.start_confirming_probe(&probe_tx);
                    Decision::Wait
                } else {
                    decision
                }
            }
            _ = probe_timer.tick() => {
                // systemd's signals bring every change of the unit; reading it now and then
                // anyway covers a signal lost on the bus.
                if unit_changes.is_none() || agent.unit_read_at.elapsed() >= UNIT_REREAD_INTERVAL {
                    agent.refresh_unit().await;
                }
                Decision::ProbeNow
            }
            Some(result) = restart_rx.recv() => {
                agent.on_action_finished(result);
                // Confirm at once that the new containerd answers.
                probe_timer.reset();
                Decision::ProbeNow
            }
            Some(()) = next_change(&mut unit_changes) => {
                agent.refresh_unit().await;
                Decision::Wait
            }
            _ = sleep_until_or_never(agent.deferred.as_ref().map(|(_, at)| *at)) => {
                agent.retry_deferred()
            }
            _ = status_timer.tick() => {
                agent.publish_sensors(false);
                Decision::Wait
            }
            Some(request) = refresh_rx.recv() => {
                agent.publish_sensors(true);
                let _ = request.send(());
                // Requests that came meanwhile are answered by the same read.
                while let Ok(request) = refresh_rx.try_recv() {
                    let _ = request.send(());
                }
                Decision::Wait
            }
        };
        agent.publish_verdicts();
        // The agent's own health: only a turning loop pets systemd's watchdog.
        let now = Instant::now();
        health.beat(now);
        notifier.pet_if_due(now);
        let state = agent.detector.state();
        if notified != Some(state) && health.readiness().is_ok() {
            let line = format!("containerd is {}", state_label(state));
            if notified.is_none() {
                info!("observer ready: sensors started and the first probe finished");
                notifier.ready(&line);
            } else {
                notifier.status(&line);
            }
            notified = Some(state);
        }
        match decision {
            Decision::Wait => {}
            Decision::ProbeNow => agent.start_probe(&probe_tx),
            Decision::Restart(verdict) => agent.act(verdict, &restart_tx),
        }
    }
    notifier.stopping();
    // issue 5 (shutdown): a restart in flight is finished or recorded, never lost silently.
    if let Some((verdict, _)) = &agent.restart_in_flight {
        info!(unit = %settings.unit, reason = ?verdict.state, "shutting down: waiting up to {SHUTDOWN_GRACE:?} for the restart in flight");
        match tokio::time::timeout(SHUTDOWN_GRACE, restart_rx.recv()).await {
            Ok(Some(result)) => agent.on_action_finished(result),
            _ => agent.record_interrupted_restart(),
        }
    }
    server.abort();
    // Dropping the sensors detaches the eBPF programs and stops the heartbeat thread.
    drop(agent);
    info!("observer stopped");
    Ok(())
}

fn budget_config(settings: &Settings) -> BudgetConfig {
    BudgetConfig {
        initial_backoff: settings.restart_backoff,
        max_restarts: settings.max_restarts as usize,
        ..BudgetConfig::default()
    }
}

/// The next change of the unit, or never when changes are not followed.
async fn next_change(
    changes: &mut Option<std::pin::Pin<Box<impl futures_util::Stream<Item = ()>>>>,
) -> Option<()> {
    use futures_util::StreamExt as _;
    match changes {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves at `at`, or never.
async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

struct Agent<'a> {
    settings: &'a Settings,
    systemd: Systemd,
    sensors: Sensors,
    detector: Detector,
    status: watch::Sender<StatusDocument>,
    metrics: Arc<Metrics>,
    clock: WallClock,
    main_pid: Option<u32>,
    /// Probes sent and not answered yet: at most one regular probe, plus one confirming
    /// probe that the detector asked for while the regular one was out.
    probes_in_flight: u8,
    /// The verdict and start of the restart in flight, if any.
    restart_in_flight: Option<(Verdict, Instant)>,
    latency: LatencyWindow,
    signals: VecDeque<SignalRecord>,
    budget: RestartBudget,
    actuator: ActuatorConfig,
    /// A verdict whose restart waits for the budget, and when to try again.
    deferred: Option<(Verdict, Instant)>,
    /// When the unit was last read from systemd.
    unit_read_at: Instant,
}

impl Agent<'_> {
    /// Reads the unit's main PID from systemd and moves the sensors to it.
    async fn refresh_unit(&mut self) {
        self.unit_read_at = Instant::now();
        let status = match tokio::time::timeout(Duration::from_secs(2), self.systemd.status()).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!("cannot read the unit's state from systemd: {e}");
                return;
            }
            Err(_) => {
                warn!("systemd did not answer within 2 s");
                return;
            }
        };
        self.set_main_pid(status.main_pid);
        self.status.send_modify(|d| d.unit_state = status);
    }

    fn set_main_pid(&mut self, pid: Option<u32>) {
        if pid == self.main_pid {
            return;
        }
        info!(old = ?self.main_pid, new = ?pid, "containerd main PID changed");
        self.main_pid = pid;
        self.detector.set_main_pid(pid);
        self.sensors.follow(pid);
        self.status.send_modify(|d| d.containerd_pid = pid);
    }

    /// Sends a probe unless one is out already.
    fn start_probe(&mut self, results: &mpsc::Sender<ProbeResult>) {
        if self.probes_in_flight == 0 {
            self.send_probe(results);
        }
    }

    /// Sends the probe that confirms a kernel suspicion, even while a regular probe is out:
    /// that one may have left before the connection that now waits was queued, and waiting
    /// for it would put up to a whole probe deadline on the verdict.
    fn start_confirming_probe(&mut self, results: &mpsc::Sender<ProbeResult>) {
        if self.probes_in_flight < 2 {
            self.send_probe(results);
        }
    }

    fn send_probe(&mut self, results: &mpsc::Sender<ProbeResult>) {
        self.probes_in_flight += 1;
        let socket = self.settings.socket.clone();
        let timeout = self.settings.probe_timeout;
        let results = results.clone();
        tokio::spawn(async move {
            let result = probe::probe_version(&socket, timeout).await;
            let _ = results.send(result).await;
        });
    }

    fn on_probe(&mut self, result: ProbeResult) -> Decision {
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        let record = ProbeRecord {
            at: humantime::format_rfc3339_micros(result.started_wall).to_string(),
            latency_ms: millis(result.latency),
            result: match &result.outcome {
                Ok(_) => "ok".to_owned(),
                Err((failure, _)) => serde_json::to_value(failure)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            },
            version: result.outcome.as_ref().ok().cloned(),
            error: result.outcome.as_ref().err().map(|(_, e)| e.clone()),
        };
        let version = record.version.clone();
        self.metrics.probe(&record.result, result.latency);
        self.status.send_modify(|d| {
            d.last_probe = Some(record);
            if version.is_some() {
                d.containerd_version = version;
            }
        });
        self.budget
            .observe_health(Instant::now(), result.outcome.is_ok());
        if result.outcome.is_ok() {
            self.deferred = None;
        }
        let observation = match result.outcome {
            Ok(version) => Observation::ProbeSucceeded {
                latency: result.latency,
                version,
            },
            Err((failure, error)) => Observation::ProbeFailed {
                started: result.started,
                failure,
                error,
            },
        };
        self.detector.observe(Instant::now(), observation)
    }

    async fn on_kernel_event(&mut self, event: KernelEvent) -> Decision {
        match event {
            KernelEvent::Exit(exit) => {
                if self.main_pid != Some(exit.pid) {
                    // A process the kernel followed from its exec before systemd told us its
                    // PID: ask systemd whether it was the unit's main process.
                    self.refresh_unit().await;
                    let was_main = self.status.borrow().unit_state.exec_main_pid == Some(exit.pid);
                    if !was_main {
                        debug!(
                            pid = exit.pid,
                            "exit of a process that was not containerd's main process"
                        );
                        return Decision::Wait;
                    }
                    self.detector.set_main_pid(Some(exit.pid));
                }
                self.on_exit(exit)
            }
            KernelEvent::Signal(s) => {
                info!(target_pid = s.target, signal = ?s.signal, sender = s.sender_pid, sender_comm = %s.sender_comm, "signal to containerd");
                if self.signals.len() == SIGNAL_HISTORY {
                    self.signals.pop_front();
                }
                self.signals.push_back(SignalRecord {
                    target: s.target,
                    signal: s.signal,
                    sender_pid: s.sender_pid,
                    sender_comm: s.sender_comm,
                    at: s.at,
                });
                Decision::Wait
            }
            KernelEvent::Accept(KernelAccept { latency, at, .. }) => {
                self.latency.record(at, latency);
                self.metrics.accept(latency);
                Decision::Wait
            }
        }
    }

    fn on_exit(&mut self, exit: KernelExit) -> Decision {
        let mut signals: Vec<SignalRecord> = self.signals.iter().cloned().collect();
        // The kernel recorded the last signal with the exit itself: it cannot arrive late.
        if let Some(s) = &exit.last_signal {
            signals.push(SignalRecord {
                target: s.target,
                signal: s.signal,
                sender_pid: s.sender_pid,
                sender_comm: s.sender_comm.clone(),
                at: s.at,
            });
        }
        let cause = (exit.source == crate::judge::detector::Source::Ebpf)
            .then(|| cause::explain(exit.pid, exit.exit_code, exit.at, &signals));
        let description = match (&cause, exit.source) {
            (Some(cause), _) => format!(
                "sched_process_exit: process {} ({}) {cause}; the agent heard of it {:.3} ms later",
                exit.pid,
                exit.comm,
                exit.delivery.as_secs_f64() * 1e3
            ),
            (None, _) => format!("pidfd: process {} exited", exit.pid),
        };
        info!(pid = exit.pid, source = ?exit.source, "{description}");
        self.metrics.exit(cause.as_ref());
        let record = ExitRecord {
            at: self.clock.format(exit.at),
            pid: exit.pid,
            source: exit.source,
            description: description.clone(),
            cause,
        };
        self.status.send_modify(|d| d.last_exit = Some(record));
        self.detector.observe(
            Instant::now(),
            Observation::ProcessExited {
                pid: exit.pid,
                at: exit.at,
                sensor: exit.source,
                detail: description,
            },
        )
    }

    /// Samples the accept queue; also says whether any connection waits in it.
    fn sample_pending(&mut self) -> (Decision, bool) {
        let now = Instant::now();
        let Some((snapshot, source)) = self.sensors.sample_pending(now) else {
            return (Decision::Wait, false);
        };
        let waiting = snapshot.count > 0;
        let record = PendingRecord {
            count: snapshot.count,
            oldest_age_ms: snapshot.oldest_age.map(millis),
            source: Some(source),
        };
        self.status.send_modify(|d| d.pending_connections = record);
        self.metrics.pending(snapshot.count, snapshot.oldest_age);
        let decision = self.detector.observe(
            now,
            Observation::Pending {
                count: snapshot.count,
                oldest_age: snapshot.oldest_age,
                sensor: source,
            },
        );
        (decision, waiting)
    }

    /// Records an action in the document, the metrics and the log, one line each.
    /// `succeeded` says whether the action did what it set out to (a restart whose job failed did not).
    fn record_action(
        &mut self,
        action: &'static str,
        verdict: &Verdict,
        result: String,
        succeeded: bool,
    ) {
        let evidence: Vec<String> = verdict.evidence.iter().map(|e| e.detail.clone()).collect();
        // Failures and refusals stand out in the log; the rest is routine.
        if policy::alarming(action, succeeded) {
            warn!(action, reason = ?verdict.state, pid = ?verdict.pid, ?evidence, "{result}");
        } else {
            info!(action, reason = ?verdict.state, pid = ?verdict.pid, ?evidence, "{result}");
        }
        self.metrics.action(action);
        let record = ActionRecord {
            at: self.clock.format(Instant::now()),
            action,
            reason: verdict.state,
            evidence,
            result,
            count: 1,
        };
        self.status
            .send_modify(|d| push_action(&mut d.actions, record));
    }

    fn publish_budget(&mut self) {
        let allowance = self.budget.allowance(Instant::now());
        let record = BudgetRecord {
            allowance,
            recent_restarts: self.budget.recent_restarts(),
            max_restarts: budget_config(self.settings).max_restarts,
            window_s: budget_config(self.settings).window.as_secs_f64(),
        };
        self.status.send_modify(|d| d.restart_budget = record);
    }

    fn act(&mut self, verdict: Verdict, done: &mpsc::Sender<ActionResult>) {
        let switches = Switches {
            paused: self.settings.pause_file.exists(),
            dry_run: self.settings.dry_run,
        };
        self.status.send_modify(|d| d.paused = switches.paused);
        let now = Instant::now();
        let action = policy::decide(
            self.restart_in_flight.is_some(),
            switches,
            &mut self.budget,
            now,
        );
        let result = match &action {
            Action::Wait => return,
            Action::Restart => None,
            Action::Paused => Some(format!(
                "paused by {}: not restarting {}",
                self.settings.pause_file.display(),
                self.settings.unit
            )),
            Action::DryRun => Some(format!("dry run: would restart {}", self.settings.unit)),
            Action::BackOff {
                retry_in,
                recent_restarts,
            } => {
                self.deferred = Some((verdict.clone(), now + *retry_in));
                Some(format!(
                    "backing off: {recent_restarts} restart(s) recently; next attempt in {:.0} s",
                    retry_in.as_secs_f64()
                ))
            }
            Action::GiveUp { recent_restarts } => {
                self.deferred = None;
                Some(format!(
                    "gave up: {recent_restarts} restarts within {:.0} min; no more until containerd is healthy again",
                    budget_config(self.settings).window.as_secs_f64() / 60.0
                ))
            }
        };
        if let Some(result) = result {
            self.record_action(action.name(), &verdict, result, true);
            if matches!(action, Action::BackOff { .. } | Action::GiveUp { .. }) {
                self.publish_budget();
            }
            return;
        }
        self.deferred = None;
        self.detector
            .observe(Instant::now(), Observation::RestartStarted);
        self.status.send_modify(|d| d.state = State::Recovering);
        self.restart_in_flight = Some((verdict.clone(), now));
        let systemd = self.systemd.clone();
        let config = self.actuator.clone();
        let done = done.clone();
        let dead_pid = (verdict.state == State::Crashed)
            .then_some(verdict.pid)
            .flatten();
        let main_pid = self.main_pid;
        tokio::spawn(async move {
            let unit = match restart::settled_status(&systemd, dead_pid, config.settle).await {
                Ok(unit) => unit,
                Err(e) => {
                    warn!("cannot read the unit before acting: {e}");
                    UnitStatus::default()
                }
            };
            let plan = policy::plan(verdict.state, &unit, dead_pid);
            let restart = match plan {
                Plan::Restart => {
                    Some(restart::restart(&systemd, &config, verdict.state, main_pid).await)
                }
                _ => None,
            };
            let _ = done
                .send(ActionResult {
                    plan,
                    unit,
                    restart,
                })
                .await;
        });
    }

    /// Tries again a restart the budget deferred, if containerd still needs one.
    fn retry_deferred(&mut self) -> Decision {
        let Some((verdict, _)) = self.deferred.take() else {
            return Decision::Wait;
        };
        if policy::needs_restart(self.detector.state()) {
            Decision::Restart(verdict)
        } else {
            Decision::Wait
        }
    }

    fn on_action_finished(&mut self, result: ActionResult) {
        let Some((verdict, started)) = self.restart_in_flight.take() else {
            return;
        };
        self.status
            .send_modify(|d| d.unit_state = result.unit.clone());
        let Some(outcome) = result.restart else {
            let Some((action, detail, observation)) = policy::settled(result.plan) else {
                unreachable!("a restart plan always carries an outcome");
            };
            self.record_action(action, &verdict, detail, true);
            self.detector.observe(Instant::now(), observation);
            self.set_main_pid(result.unit.main_pid);
            return;
        };
        self.budget.record_restart(started);
        let summary = if outcome.succeeded() {
            format!(
                "restarted {} through systemd: job {} in {:.0} ms, new PID {}{}",
                self.settings.unit,
                outcome.job_result,
                millis(outcome.duration),
                outcome.new_pid.map_or("unknown".into(), |p| p.to_string()),
                if outcome.killed_main {
                    " (the stop hung: the main process was killed)"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "restart of {} failed: job {}{}",
                self.settings.unit,
                outcome.job_result,
                outcome
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        };
        self.metrics.restart(verdict.state, &outcome.job_result);
        self.record_action("restart", &verdict, summary, outcome.succeeded());
        self.detector.observe(
            Instant::now(),
            Observation::RestartFinished {
                ok: outcome.succeeded(),
            },
        );
        self.set_main_pid(outcome.new_pid);
        let record = RestartRecord {
            at: self.clock.format(started),
            reason: verdict.state,
            old_pid: verdict.pid,
            job_result: outcome.job_result,
            error: outcome.error,
            duration_ms: millis(outcome.duration),
            new_pid: outcome.new_pid,
            stack_dump: outcome.stack_dump,
            killed_main: outcome.killed_main,
        };
        self.status
            .send_modify(|d| push_bounded(&mut d.restarts, record));
        self.publish_budget();
    }

    /// At shutdown, records the restart still in flight: systemd carries on with the job, but
    /// the agent will not see its result.
    fn record_interrupted_restart(&mut self) {
        let Some((verdict, _)) = self.restart_in_flight.take() else {
            return;
        };
        self.metrics.restart(verdict.state, "interrupted");
        let result = format!(
            "interrupted by shutdown: systemd carries on with the restart of {}, but its result was not seen",
            self.settings.unit
        );
        self.record_action("restart", &verdict, result, false);
    }

    /// Refreshes the slowly changing parts: sensor costs, heartbeat counts, latency window.
    /// Copies the sensors' state into the document; `fresh_costs` reads the programs'
    /// statistics again (see [`Endpoint::refresh`]).
    fn publish_sensors(&mut self, fresh_costs: bool) {
        self.publish_budget();
        let paused = self.settings.pause_file.exists();
        self.status.send_if_modified(|d| {
            let changed = d.paused != paused;
            d.paused = paused;
            changed
        });
        let sensors = self.sensors.record(fresh_costs);
        let heartbeat = self.sensors.heartbeat();
        let latency = self.latency.summary(Instant::now()).map(|s| LatencyRecord {
            window_s: self.latency.window().as_secs_f64(),
            count: s.count,
            p50_ms: millis(s.p50),
            p99_ms: millis(s.p99),
            max_ms: millis(s.max),
        });
        self.status.send_modify(|d| {
            d.sensors = sensors;
            d.heartbeat = heartbeat;
            d.accept_latency = latency;
        });
    }

    /// Copies new verdicts into the document and the log, one line each.
    fn publish_verdicts(&mut self) {
        let state = self.detector.state();
        for verdict in self.detector.take_verdicts() {
            let record = VerdictRecord::from_verdict(&verdict, &self.clock);
            let evidence: Vec<&str> = record.evidence.iter().map(|e| e.detail.as_str()).collect();
            info!(
                verdict = ?record.state,
                pid = ?record.pid,
                detection_latency_ms = record.detection_latency_ms,
                evidence = ?evidence,
                "verdict"
            );
            self.metrics.verdict(record.state);
            self.status
                .send_modify(|d| push_bounded(&mut d.verdicts, record));
        }
        self.metrics.set_state(state);
        self.status.send_if_modified(|d| {
            let changed = d.state != state;
            d.state = state;
            changed
        });
    }
}
