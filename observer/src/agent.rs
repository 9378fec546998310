//! The agent's event loop: runs the sensors, feeds the detector, hands its decisions to the
//! actuator and keeps the status document current.
//!
//! Everything slow (probes, restarts) runs in its own task and reports back through a
//! channel, so an exit event is never queued behind a hanging probe.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    actuator::{self, RestartOutcome},
    config::Settings,
    detector::{Decision, Detector, DetectorConfig, Observation, Source, State, Verdict},
    kernel::{KernelExit, KernelSensors},
    probe::{self, ProbeResult},
    status::{
        self, ProbeRecord, RestartRecord, SensorStatus, Sensors, StatusDocument, VerdictRecord,
        WallClock, millis, push_bounded,
    },
    systemd::Systemd,
};

const EXIT_HOOK: &str = "tracepoint sched/sched_process_exit";

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
    let clock = WallClock::new();

    let (exit_tx, mut exit_rx) = mpsc::channel::<KernelExit>(64);
    let (mut kernel, exit_sensor) = if settings.no_ebpf {
        (None, sensor_off("turned off by --no-ebpf"))
    } else {
        match KernelSensors::load(exit_tx) {
            Ok(k) => (
                Some(k),
                SensorStatus {
                    state: "on",
                    hook: EXIT_HOOK.into(),
                    reason: None,
                },
            ),
            Err(e) => {
                warn!("process-exit sensor is off: {e}");
                (None, sensor_off(&e.to_string()))
            }
        }
    };

    let mut detector = Detector::new(DetectorConfig::default());
    let (status_tx, status_rx) = watch::channel(StatusDocument {
        state: detector.state(),
        unit: settings.unit.clone(),
        containerd_pid: None,
        containerd_version: None,
        mode: if kernel.is_some() {
            "fused"
        } else {
            "polling_only"
        },
        dry_run: settings.dry_run,
        sensors: Sensors {
            process_exit: exit_sensor,
        },
        last_probe: None,
        verdicts: Default::default(),
        restarts: Default::default(),
    });
    let server = tokio::spawn(status::serve(listener, status_rx));
    info!(
        status = %format!("http://{}/status", settings.status_listen),
        unit = %settings.unit,
        socket = %settings.socket.display(),
        bus = %settings.bus,
        mode = status_tx.borrow().mode,
        "observer started"
    );

    let mut loop_state = Loop {
        settings: &settings,
        systemd,
        kernel: kernel.take(),
        detector: &mut detector,
        status: status_tx,
        clock,
        main_pid: None,
        probe_in_flight: false,
        restart_in_flight: None,
    };
    loop_state.refresh_unit().await;

    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(4);
    let (restart_tx, mut restart_rx) = mpsc::channel::<RestartOutcome>(1);
    let mut probe_timer = tokio::time::interval(settings.probe_interval);
    probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    loop {
        let decision = tokio::select! {
            _ = &mut shutdown => break,
            _ = probe_timer.tick() => {
                loop_state.refresh_unit().await;
                loop_state.start_probe(&probe_tx);
                Decision::Wait
            }
            Some(result) = probe_rx.recv() => loop_state.on_probe(result),
            Some(exit) = exit_rx.recv() => loop_state.on_exit(exit),
            Some(outcome) = restart_rx.recv() => {
                loop_state.on_restart_finished(outcome);
                // Confirm at once that the new containerd answers.
                probe_timer.reset();
                loop_state.start_probe(&probe_tx);
                Decision::Wait
            }
        };
        loop_state.publish_verdicts();
        if let Decision::Restart(verdict) = decision {
            loop_state.act(verdict, &restart_tx);
        }
    }
    server.abort();
    info!("observer stopped");
    Ok(())
}

fn sensor_off(reason: &str) -> SensorStatus {
    SensorStatus {
        state: "off",
        hook: EXIT_HOOK.into(),
        reason: Some(reason.to_owned()),
    }
}

/// The loop's state, apart from the channels.
struct Loop<'a> {
    settings: &'a Settings,
    systemd: Systemd,
    kernel: Option<KernelSensors>,
    detector: &'a mut Detector,
    status: watch::Sender<StatusDocument>,
    clock: WallClock,
    main_pid: Option<u32>,
    probe_in_flight: bool,
    /// The verdict and start of the restart in flight, if any.
    restart_in_flight: Option<(Verdict, Instant)>,
}

impl Loop<'_> {
    /// Reads the unit's main PID from systemd and points the kernel filter at it.
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
        if let (Some(kernel), Some(pid)) = (self.kernel.as_mut(), pid)
            && let Err(e) = kernel.watch_only(pid)
        {
            error!("cannot point the kernel sensors at PID {pid}: {e}");
        }
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

    fn on_exit(&mut self, exit: KernelExit) -> Decision {
        let detail = format!(
            "sched_process_exit: process {} ended with thread {} ({}); the agent heard of it {:.3} ms later",
            exit.pid,
            exit.last_thread,
            exit.comm,
            exit.delivery.as_secs_f64() * 1e3
        );
        info!(pid = exit.pid, comm = %exit.comm, "kernel reports containerd's process exited");
        self.detector.observe(
            Instant::now(),
            Observation::ProcessExited {
                pid: exit.pid,
                at: exit.at,
                sensor: Source::Ebpf,
                detail,
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
