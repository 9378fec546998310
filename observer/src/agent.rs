//! The agent's event loop: runs the sensors, feeds the detector, hands its decisions to the
//! actuator and keeps the status document current.
//!
//! Everything slow (probes, restarts) runs in its own task and reports back through a
//! channel, so a kernel event is never queued behind a hanging probe.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    actuator::{self, RestartOutcome},
    cause::{self, SignalRecord},
    config::Settings,
    detector::{Decision, Detector, DetectorConfig, Observation, State, Verdict},
    kernel::{KernelAccept, KernelEvent, KernelExit},
    latency::LatencyWindow,
    probe::{self, ProbeResult},
    sensors::Sensors,
    status::{
        self, ExitRecord, LatencyRecord, PendingRecord, ProbeRecord, RestartRecord, StatusDocument,
        VerdictRecord, WallClock, millis, push_bounded,
    },
    systemd::Systemd,
};

/// How often the accept queue is sampled.
const PENDING_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Window of the accept-latency percentiles.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);
/// Recent signals kept to name an exit's cause.
const SIGNAL_HISTORY: usize = 64;

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
    let systemd = Systemd::connect(&settings.bus, &settings.unit).await?;

    let (kernel_tx, mut kernel_rx) = mpsc::channel::<KernelEvent>(256);
    let sensors = Sensors::start(&settings, kernel_tx);
    let mode = if settings.no_ebpf {
        "polling_only"
    } else if sensors.ebpf_loaded() {
        "fused"
    } else {
        "fallback"
    };
    let detector = Detector::new(DetectorConfig {
        stall_threshold: settings.stall_threshold,
        confirm_spacing: settings.probe_timeout,
        ..DetectorConfig::default()
    });
    let (status_tx, status_rx) = watch::channel(StatusDocument {
        state: detector.state(),
        unit: settings.unit.clone(),
        containerd_pid: None,
        containerd_version: None,
        mode,
        dry_run: settings.dry_run,
        sensors: sensors.record(),
        last_probe: None,
        pending_connections: PendingRecord::default(),
        accept_latency: None,
        heartbeat: sensors.heartbeat(),
        last_exit: None,
        verdicts: Default::default(),
        restarts: Default::default(),
    });
    let server = tokio::spawn(status::serve(listener, status_rx));
    info!(
        status = %format!("http://{}/status", settings.status_listen),
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
        clock: WallClock::new(),
        main_pid: None,
        probe_in_flight: false,
        restart_in_flight: None,
        latency: LatencyWindow::new(LATENCY_WINDOW),
        signals: VecDeque::new(),
    };
    agent.refresh_unit().await;

    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(4);
    let (restart_tx, mut restart_rx) = mpsc::channel::<RestartOutcome>(1);
    let mut probe_timer = tokio::time::interval(settings.probe_interval);
    probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending_timer = tokio::time::interval(PENDING_SAMPLE_INTERVAL);
    pending_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut status_timer = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);

    loop {
        let decision = tokio::select! {
            _ = &mut shutdown => break,
            Some(event) = kernel_rx.recv() => agent.on_kernel_event(event),
            Some(result) = probe_rx.recv() => agent.on_probe(result),
            _ = pending_timer.tick() => agent.sample_pending(),
            _ = probe_timer.tick() => {
                agent.refresh_unit().await;
                Decision::ProbeNow
            }
            Some(outcome) = restart_rx.recv() => {
                agent.on_restart_finished(outcome);
                // Confirm at once that the new containerd answers.
                probe_timer.reset();
                Decision::ProbeNow
            }
            _ = status_timer.tick() => {
                agent.publish_sensors();
                Decision::Wait
            }
        };
        agent.publish_verdicts();
        match decision {
            Decision::Wait => {}
            Decision::ProbeNow => agent.start_probe(&probe_tx),
            Decision::Restart(verdict) => agent.act(verdict, &restart_tx),
        }
    }
    server.abort();
    info!("observer stopped");
    Ok(())
}

struct Agent<'a> {
    settings: &'a Settings,
    systemd: Systemd,
    sensors: Sensors,
    detector: Detector,
    status: watch::Sender<StatusDocument>,
    clock: WallClock,
    main_pid: Option<u32>,
    probe_in_flight: bool,
    /// The verdict and start of the restart in flight, if any.
    restart_in_flight: Option<(Verdict, Instant)>,
    latency: LatencyWindow,
    signals: VecDeque<SignalRecord>,
}

impl Agent<'_> {
    /// Reads the unit's main PID from systemd and moves the sensors to it.
    async fn refresh_unit(&mut self) {
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

    fn start_probe(&mut self, results: &mpsc::Sender<ProbeResult>) {
        if self.probe_in_flight {
            return;
        }
        self.probe_in_flight = true;
        let socket = self.settings.socket.clone();
        let timeout = self.settings.probe_timeout;
        let results = results.clone();
        tokio::spawn(async move {
            let result = probe::probe_version(&socket, timeout).await;
            let _ = results.send(result).await;
        });
    }

    fn on_probe(&mut self, result: ProbeResult) -> Decision {
        self.probe_in_flight = false;
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
        self.status.send_modify(|d| {
            d.last_probe = Some(record);
            if version.is_some() {
                d.containerd_version = version;
            }
        });
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

    fn on_kernel_event(&mut self, event: KernelEvent) -> Decision {
        match event {
            KernelEvent::Exit(exit) => self.on_exit(exit),
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
                Decision::Wait
            }
        }
    }

    fn on_exit(&mut self, exit: KernelExit) -> Decision {
        let signals: Vec<SignalRecord> = self.signals.iter().cloned().collect();
        let cause = (exit.source == crate::detector::Source::Ebpf)
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

    fn sample_pending(&mut self) -> Decision {
        let now = Instant::now();
        let Some((snapshot, source)) = self.sensors.sample_pending(now) else {
            return Decision::Wait;
        };
        let record = PendingRecord {
            count: snapshot.count,
            oldest_age_ms: snapshot.oldest_age.map(millis),
            source: Some(source),
        };
        self.status.send_modify(|d| d.pending_connections = record);
        self.detector.observe(
            now,
            Observation::Pending {
                count: snapshot.count,
                oldest_age: snapshot.oldest_age,
                sensor: source,
            },
        )
    }

    fn act(&mut self, verdict: Verdict, done: &mpsc::Sender<RestartOutcome>) {
        if self.settings.dry_run {
            info!(reason = ?verdict.state, "dry run: would restart {}", self.settings.unit);
            let record = RestartRecord {
                at: self.clock.format(Instant::now()),
                reason: verdict.state,
                old_pid: verdict.pid,
                job_result: "dry_run".into(),
                error: None,
                duration_ms: 0.0,
                new_pid: None,
            };
            self.status
                .send_modify(|d| push_bounded(&mut d.restarts, record));
            return;
        }
        if self.restart_in_flight.is_some() {
            return;
        }
        info!(unit = %self.settings.unit, reason = ?verdict.state, pid = ?verdict.pid, "restarting containerd through systemd");
        self.detector
            .observe(Instant::now(), Observation::RestartStarted);
        self.status.send_modify(|d| d.state = State::Recovering);
        self.restart_in_flight = Some((verdict, Instant::now()));
        let systemd = self.systemd.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let outcome = actuator::restart(&systemd).await;
            let _ = done.send(outcome).await;
        });
    }

    fn on_restart_finished(&mut self, outcome: RestartOutcome) {
        let Some((verdict, started)) = self.restart_in_flight.take() else {
            return;
        };
        if outcome.succeeded() {
            info!(job_result = %outcome.job_result, new_pid = ?outcome.new_pid, duration_ms = millis(outcome.duration), "restart finished");
        } else {
            error!(job_result = %outcome.job_result, error = ?outcome.error, "restart failed");
        }
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
        };
        self.status
            .send_modify(|d| push_bounded(&mut d.restarts, record));
    }

    /// Refreshes the slowly changing parts: sensor costs, heartbeat counts, latency window.
    fn publish_sensors(&mut self) {
        let sensors = self.sensors.record();
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
            self.status
                .send_modify(|d| push_bounded(&mut d.verdicts, record));
        }
        self.status.send_if_modified(|d| {
            let changed = d.state != state;
            d.state = state;
            changed
        });
    }
}
