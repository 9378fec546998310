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
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    act::restart::{self, ActuatorConfig, RestartOutcome},
    act::systemd::{BusEvent, CALL_DEADLINE, Systemd, UnitStatus},
    config::Settings,
    daemon::health::Health,
    daemon::limits,
    daemon::notify::Notifier,
    judge::budget::{Allowance, BudgetConfig, RestartBudget},
    judge::cause::{self, SignalRecord},
    judge::detector::{
        Decision, Detector, DetectorConfig, Observation, ProbeChannel, ProbeFailure, Source, State,
        Verdict,
    },
    judge::latency::LatencyWindow,
    judge::layer::{Layer, Owner},
    judge::policy::{self, Action, Plan, Switches},
    judge::schedule::{Reading, ScheduleWatch},
    report::metrics::{Metrics, state_label},
    report::status::{
        self, ActionRecord, BlockedRecord, BudgetRecord, BusRecord, DegradedRecord, Endpoint,
        ExitRecord, GapRecord, LatencyRecord, LayerProbeRecord, LayerRecord, ObserverRecord,
        PendingRecord, ProbeRecord, RefreshRequest, RestartRecord, StatusDocument, VerdictRecord,
        WallClock, millis, push_action, push_bounded,
    },
    sense::kernel::{KernelAccept, KernelEvent, KernelExit},
    sense::ladder::{self, Ladder, LayerOutcome, LayerResult, LayerTiming},
    sense::listener::{self, Ownership},
    sense::probe::{self, OpenConnection, ProbeResult},
    sense::process::ProcessIdentity,
    sense::sensors::Sensors,
};

/// The stream of systemd's signals the agent follows; it ends when the bus connection is lost.
type BusEvents = std::pin::Pin<Box<dyn futures_util::Stream<Item = BusEvent> + Send>>;

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
/// How often the slowly changing parts of the status document are refreshed; the loop
/// turns at least this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How often containerd's and its shims' threads are looked at for D state.
const BLOCKED_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Window of the accept-latency percentiles.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);
/// Recent signals kept to name an exit's cause.
const SIGNAL_HISTORY: usize = 64;
/// How long the main loop waits for systemd in one call: a turn must stay well within
/// [`crate::daemon::health::LIVENESS_DEADLINE`]. Calls made off the loop have the bus's own
/// deadline ([`CALL_DEADLINE`]).
const LOOP_CALL_DEADLINE: Duration = Duration::from_secs(2);
/// First and longest wait between two attempts to connect to systemd again.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));
/// How often, until containerd first answers, the agent asks the kernel whether the
/// listener at `--socket` is containerd's.
const OWNERSHIP_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long shutdown waits for a restart in flight to finish before recording it as
/// interrupted (systemd carries on with the job either way).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    // Before anything opens a descriptor: the status endpoint sizes its share from it.
    let nofile = match limits::raise_nofile() {
        Ok(soft) => Some(soft),
        Err(e) => {
            warn!("cannot raise the soft descriptor limit to the hard one ({e})");
            limits::nofile().ok().map(|(soft, _)| soft)
        }
    };
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
        blocked_threshold: settings.blocked_threshold,
        ..DetectorConfig::default()
    });
    let layers = layer_slots(&settings);
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
        open_probe: None,
        failed_probes: 0,
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
        bus: BusRecord {
            connected: true,
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            reconnects: 0,
            last_error: None,
        },
        config_problem: None,
        layers: layers.iter().map(LayerSlot::record).collect(),
        blocked_threads: BlockedRecord {
            source: sensors.blocked_source(),
            interval_ms: millis(BLOCKED_SAMPLE_INTERVAL),
            threshold_ms: millis(settings.blocked_threshold),
            ..BlockedRecord::default()
        },
    });
    for slot in layers.iter().filter(|s| s.enabled) {
        metrics.layer_enabled(slot.layer.name());
    }
    let (refresh_tx, mut refresh_rx) = mpsc::channel::<RefreshRequest>(16);
    let endpoint = Endpoint {
        status: status_rx,
        health: health.clone(),
        metrics: metrics.clone(),
        refresh: refresh_tx,
    };
    // One token stops every task the agent started: the HTTP server (gracefully), the
    // Kubernetes reporter (after its last condition), probes and reconnects.
    let stop = CancellationToken::new();
    let server = tokio::spawn(endpoint.serve(listener, unix_listener, stop.clone()));
    let reporter = crate::report::kubernetes::spawn(
        status_tx.subscribe(),
        settings.no_kubernetes,
        stop.clone(),
    );
    info!(
        status = %format!("http://{}/status", settings.status_listen),
        status_socket = ?settings.status_socket,
        watchdog = ?notifier.watchdog_every().map(|d| d * 2),
        unit = %settings.unit,
        socket = %settings.socket.display(),
        bus = %settings.bus,
        mode,
        nofile,
        status_connections = nofile.map(status::server::connection_cap),
        "observer started"
    );

    let watches_queue = sensors.watches_queue();
    let mut agent = Agent {
        settings: &settings,
        stop: stop.clone(),
        systemd: Some(systemd),
        health: health.clone(),
        bus_lost: None,
        main_identity: None,
        ownership_checked: None,
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
            stack_dump_wait: settings.stack_dump_wait,
            ..ActuatorConfig::default()
        },
        deferred: None,
        unit_read_at: Instant::now(),
        open_connection: OpenConnection::default(),
        open_probe_in_flight: false,
        schedule: ScheduleWatch::new(
            if watches_queue {
                IDLE_PENDING_SAMPLE_INTERVAL
            } else {
                STATUS_INTERVAL
            },
            settings.stall_threshold / 2,
        ),
        last_known_pid: None,
        ladder: Ladder::new(&settings.socket, &settings.snapshotter),
        layers,
    };
    agent.refresh_unit().await;
    // systemd tells us at once when the unit changes (a new main PID after a restart by
    // systemd or an operator), so the sensors follow without waiting for the next tick; the
    // stream's end says that the bus connection is lost.
    let mut bus_events = agent.follow_bus().await;
    let (reconnected_tx, mut reconnected_rx) = mpsc::channel::<Systemd>(1);

    let (probe_tx, mut probe_rx) = mpsc::channel::<ProbeResult>(4);
    let (restart_tx, mut restart_rx) = mpsc::channel::<ActionResult>(1);
    let (layer_tx, mut layer_rx) = mpsc::channel::<LayerResult>(16);
    let mut blocked_timer = tokio::time::interval(BLOCKED_SAMPLE_INTERVAL);
    blocked_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe_timer = tokio::time::interval(settings.probe_interval);
    probe_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `None` when no sensor watches the accept queue (probes only): no sampling at all.
    let mut next_pending_sample = agent.sensors.watches_queue().then(Instant::now);
    let mut status_timer = tokio::time::interval(STATUS_INTERVAL);
    tokio::pin!(shutdown);
    // The state last told to systemd; `None` until READY=1 was sent.
    let mut notified: Option<State> = None;

    loop {
        let decision = tokio::select! {
            _ = &mut shutdown => break,
            Some(event) = kernel_rx.recv() => {
                agent.check_schedule(&probe_tx);
                agent.on_kernel_event(event).await
            }
            Some(result) = probe_rx.recv() => {
                // First: a result whose deadline ran across the observer's own gap is no
                // evidence, and the detector must know of the gap before it sees it.
                agent.check_schedule(&probe_tx);
                if result.channel == ProbeChannel::Fresh {
                    health.probe_finished();
                }
                agent.on_probe(result)
            }
            _ = sleep_until_or_never(next_pending_sample) => {
                agent.check_schedule(&probe_tx);
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
                agent.check_schedule(&probe_tx);
                // systemd's signals bring every change of the unit; reading it now and then
                // anyway covers a signal lost on the bus.
                if bus_events.is_none() || agent.unit_read_at.elapsed() >= UNIT_REREAD_INTERVAL {
                    agent.refresh_unit().await;
                }
                agent.check_ownership();
                Decision::ProbeNow
            }
            _ = sleep_until_or_never(agent.next_layer_due()) => {
                agent.start_due_layers(&layer_tx);
                Decision::Wait
            }
            Some(result) = layer_rx.recv() => agent.on_layer(result),
            _ = blocked_timer.tick() => agent.sample_blocked(),
            Some(result) = restart_rx.recv() => {
                agent.on_action_finished(result);
                // Confirm at once that the new containerd answers.
                probe_timer.reset();
                Decision::ProbeNow
            }
            event = next_change(&mut bus_events) => {
                match event {
                    Some(BusEvent::UnitChanged) => agent.refresh_unit().await,
                    // systemd re-executed or left the bus: its signals and our view of the
                    // unit are to be made again, on a fresh connection.
                    Some(BusEvent::ManagerChanged) => {
                        agent.bus_lost = Some("systemd's manager left or rejoined the bus (daemon-reexec?)".into());
                    }
                    None => agent.bus_lost = Some("the D-Bus connection closed".into()),
                }
                Decision::Wait
            }
            Some(systemd) = reconnected_rx.recv() => {
                agent.systemd = Some(systemd);
                // Listen first, then read, so that no change falls between the two.
                bus_events = agent.follow_bus().await;
                agent.refresh_unit().await;
                if bus_events.is_some() && agent.bus_lost.is_none() {
                    agent.on_bus_connected();
                }
                Decision::Wait
            }
            _ = sleep_until_or_never(agent.deferred.as_ref().map(|(_, at)| *at)) => {
                agent.retry_deferred()
            }
            _ = status_timer.tick() => {
                agent.check_schedule(&probe_tx);
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
        if let Some(reason) = agent.bus_lost.take()
            && agent.systemd.is_some()
        {
            bus_events = None;
            agent.on_bus_lost(reason, reconnected_tx.clone());
        }
        agent.publish_verdicts();
        // The agent's own health: only a turning loop pets systemd's watchdog.
        let now = Instant::now();
        health.beat(now);
        notifier.pet_if_due(now);
        let state = agent.detector.state();
        if notified != Some(state) && health.started() {
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
            Decision::Act(verdict) => agent.act(verdict, &restart_tx),
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
    stop.cancel();
    // The reporter gets to write the last condition; the server to finish its answers.
    if let Some(reporter) = reporter {
        let _ = tokio::time::timeout(
            crate::report::kubernetes::LAST_WORDS + Duration::from_secs(1),
            reporter,
        )
        .await;
    }
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(e))) => warn!("the status endpoint failed while stopping: {e}"),
        Ok(_) => {}
        Err(_) => warn!("the status endpoint did not finish its answers within 2 s"),
    }
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

/// One deeper layer of the probe ladder and when it is due.
struct LayerSlot {
    layer: Layer,
    timing: LayerTiming,
    /// Asked for (by `--probes`, or by default).
    enabled: bool,
    /// Named in `--probes`: a layer this containerd does not serve is then worth a warning.
    explicit: bool,
    /// Why the running containerd does not serve it, once it said so.
    unsupported: Option<String>,
    next_due: Instant,
    in_flight: bool,
}

impl LayerSlot {
    fn record(&self) -> LayerRecord {
        let state = match (&self.unsupported, self.enabled) {
            (Some(_), _) => "unsupported",
            (None, true) => "on",
            (None, false) => "off",
        };
        LayerRecord {
            layer: self.layer,
            state,
            reason: self.unsupported.clone(),
            period_ms: millis(self.timing.period),
            deadline_ms: millis(self.timing.deadline),
            last: None,
        }
    }

    fn due(&self) -> Option<Instant> {
        (self.enabled && self.unsupported.is_none() && !self.in_flight).then_some(self.next_due)
    }
}

/// The ladder's layers below `Version()`, each due at once.
fn layer_slots(settings: &Settings) -> Vec<LayerSlot> {
    let now = Instant::now();
    Layer::ALL
        .into_iter()
        .filter(|l| *l != Layer::Version)
        .map(|layer| {
            let explicit = settings.probes.as_ref().is_some_and(|p| p.contains(&layer));
            LayerSlot {
                layer,
                timing: ladder::timing(layer, settings.ladder_interval),
                enabled: settings.probes.is_none() || explicit,
                explicit,
                unsupported: None,
                next_due: now,
                in_flight: false,
            }
        })
        .collect()
}

/// Kills hung shims (`--kill-hung-shims`); containerd itself is left running.
fn kill_shims(pids: &[u32]) -> String {
    let results: Vec<String> = pids
        .iter()
        .map(|&pid| {
            let target = libc::pid_t::try_from(pid).unwrap_or(0);
            let rc = if target > 0 {
                // SAFETY: kill(2) has no memory-safety preconditions; pid 0 is never signalled.
                unsafe { libc::kill(target, libc::SIGKILL) }
            } else {
                -1
            };
            if rc == 0 {
                format!("shim {pid} killed (SIGKILL)")
            } else {
                format!("shim {pid} not killed: {}", std::io::Error::last_os_error())
            }
        })
        .collect();
    format!("{}; containerd is not restarted", results.join(", "))
}

/// The next event from systemd, `None` once the connection is lost, or never while there is
/// no connection.
async fn next_change(events: &mut Option<BusEvents>) -> Option<BusEvent> {
    use futures_util::StreamExt as _;
    match events {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Connects to systemd again, with a growing wait between attempts, until it answers or the
/// agent stops listening.
async fn reconnect(bus: crate::config::Bus, unit: String, connected: mpsc::Sender<Systemd>) {
    let (mut wait, longest) = RECONNECT_BACKOFF;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = connected.closed() => return,
        }
        match Systemd::connect(&bus, &unit).await {
            Ok(systemd) => {
                let _ = connected.send(systemd).await;
                return;
            }
            Err(e) => {
                debug!("connecting to systemd again failed, next attempt in {wait:?}: {e}");
                wait = (wait * 2).min(longest);
            }
        }
    }
}

/// The actuator's steps: reads the unit once systemd has noticed a crash, plans, prepares a
/// hung containerd's restart (its goroutine dump), then looks at the unit again before it
/// restarts: an operator's `systemctl stop` issued meanwhile wins.
async fn carry_out(
    systemd: Systemd,
    config: ActuatorConfig,
    verdict: State,
    dead_pid: Option<u32>,
    main: Option<ProcessIdentity>,
) -> ActionResult {
    let unit = match restart::settled_status(&systemd, dead_pid, config.settle).await {
        Ok(unit) => unit,
        Err(e) => {
            warn!("cannot read the unit before acting: {e}");
            UnitStatus::default()
        }
    };
    let plan = policy::plan(verdict, &unit, dead_pid);
    if plan != Plan::Restart {
        return ActionResult {
            plan,
            unit,
            restart: None,
        };
    }
    // Whatever job someone else queues on the unit while the restart is prepared wins: an
    // operator's stop above all, even one that has already finished (a stop of a hung
    // containerd ends in `failed` after TimeoutStopSec, which alone would look like a crash).
    let prepare = restart::prepare(&systemd, &config, verdict, main);
    let (dump, queued) = match systemd.watch_jobs().await {
        Ok(mut jobs) => jobs.during(prepare).await,
        Err(e) => {
            warn!("cannot watch the unit's jobs while preparing the restart: {e}");
            (prepare.await, None)
        }
    };
    let unit = systemd.status().await.unwrap_or(unit);
    let plan = match queued.as_deref() {
        Some("stop") => Plan::LeaveStopped(
            "a stop job was queued on the unit while the restart was being prepared: the operator's stop wins".into(),
        ),
        Some(job) => Plan::LeaveToSystemd(format!(
            "a {job} job was queued on the unit while the restart was being prepared"
        )),
        None => policy::plan(verdict, &unit, dead_pid),
    };
    if plan != Plan::Restart {
        return ActionResult {
            plan,
            unit,
            restart: None,
        };
    }
    let outcome = restart::restart(&systemd, &config, main, dump).await;
    if !outcome.succeeded() {
        // `RestartUnit(fail)` refuses while another job is queued: a stop, say. Then the
        // unit's state says what happened, and a stop is left alone.
        if let Ok(unit) = systemd.status().await
            && let stopped @ Plan::LeaveStopped(_) = policy::plan(verdict, &unit, dead_pid)
        {
            return ActionResult {
                plan: stopped,
                unit,
                restart: None,
            };
        }
    }
    ActionResult {
        plan,
        unit,
        restart: Some(outcome),
    }
}

/// Runs `work` in a task of its own for at most `limit`: its output, or why there is none
/// (it panicked, or it was still running at `limit` and was aborted).
async fn bounded<T: Send + 'static>(
    limit: Duration,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    let task = tokio::spawn(work);
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(format!("the actuator failed: {e}")),
        Err(_) => {
            abort.abort();
            Err(format!("the actuator did not finish within {limit:?}"))
        }
    }
}

/// What a restart came to when the actuator itself failed (a panic, or a step past every
/// deadline).
fn actuator_failed(error: String) -> ActionResult {
    warn!("{error}");
    ActionResult {
        plan: Plan::Restart,
        unit: UnitStatus::default(),
        restart: Some(RestartOutcome {
            job_result: "error".into(),
            error: Some(error),
            duration: Duration::ZERO,
            new_pid: None,
            stack_dump: None,
            killed_main: false,
            escalation: None,
        }),
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
    /// Cancelled when the agent stops: the tasks it started end.
    stop: CancellationToken,
    /// The connection to systemd; `None` while it is lost and being made again.
    systemd: Option<Systemd>,
    health: Arc<Health>,
    /// Why the connection to systemd failed, noticed during this turn of the loop.
    bus_lost: Option<String>,
    /// containerd's main process as systemd named it, with its start time.
    main_identity: Option<ProcessIdentity>,
    /// When the listener at `--socket` was last checked for being containerd's.
    ownership_checked: Option<Instant>,
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
    /// The connection kept open for the second probe, beside the fresh-connection one.
    open_connection: OpenConnection,
    open_probe_in_flight: bool,
    /// Gaps in the observer's own scheduling.
    schedule: ScheduleWatch,
    /// The latest main PID systemd named, and its restart counter (`NRestarts`) then: a
    /// new PID that neither the observer nor systemd's `Restart=` made is an operator's.
    last_known_pid: Option<(u32, u32)>,
    ladder: Arc<Ladder>,
    layers: Vec<LayerSlot>,
}

impl Agent<'_> {
    /// Reads the unit's main PID from systemd and moves the sensors to it. A failed read
    /// counts as a lost connection: the loop connects again.
    async fn refresh_unit(&mut self) {
        self.unit_read_at = Instant::now();
        let Some(systemd) = &self.systemd else {
            return;
        };
        let answer = tokio::time::timeout(LOOP_CALL_DEADLINE, systemd.status()).await;
        // The loop waited for systemd on purpose; that is no gap in its own scheduling (the
        // probes run in their own tasks meanwhile, their deadlines are their own).
        self.schedule.resume(read_clocks());
        let status = match answer {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!("cannot read the unit's state from systemd: {e}");
                self.bus_lost = Some(e.to_string());
                return;
            }
            Err(_) => {
                warn!("systemd did not answer within {LOOP_CALL_DEADLINE:?}");
                self.bus_lost = Some(format!(
                    "systemd did not answer within {LOOP_CALL_DEADLINE:?}"
                ));
                return;
            }
        };
        self.note_operator_restart(&status);
        self.set_main_pid(status.main_pid);
        // A notify unit whose start job has not finished: containerd never said it is ready.
        self.detector.set_unit_starting(
            status.active_state == "activating"
                && (status.sub_state == "start" || status.job.as_deref() == Some("start")),
        );
        self.status.send_modify(|d| d.unit_state = status);
    }

    /// Subscribes to systemd's signals on the current connection; `None` (and the connection
    /// counted lost) when that fails.
    async fn follow_bus(&mut self) -> Option<BusEvents> {
        let systemd = self.systemd.as_ref()?;
        match tokio::time::timeout(LOOP_CALL_DEADLINE, systemd.changes()).await {
            Ok(Ok(stream)) => Some(Box::pin(stream)),
            Ok(Err(e)) => {
                self.bus_lost = Some(format!("cannot follow systemd's signals: {e}"));
                None
            }
            Err(_) => {
                self.bus_lost = Some(format!(
                    "systemd's signals could not be subscribed to within {LOOP_CALL_DEADLINE:?}"
                ));
                None
            }
        }
    }

    /// The connection to systemd is lost: say so everywhere, and connect again in the
    /// background.
    fn on_bus_lost(&mut self, reason: String, connected: mpsc::Sender<Systemd>) {
        warn!(
            bus = %self.settings.bus,
            "lost the connection to systemd ({reason}); containerd cannot be restarted until it is back; connecting again"
        );
        self.systemd = None;
        self.health.set_bus_connected(false);
        self.metrics.bus(false);
        let since = self.clock.format(Instant::now());
        self.status.send_modify(|d| {
            d.bus.connected = false;
            d.bus.since = since;
            d.bus.last_error = Some(reason);
        });
        let stop = self.stop.clone();
        let reconnect = reconnect(
            self.settings.bus.clone(),
            self.settings.unit.clone(),
            connected,
        );
        tokio::spawn(async move {
            tokio::select! {
                () = reconnect => {}
                () = stop.cancelled() => {}
            }
        });
    }

    fn on_bus_connected(&mut self) {
        info!(bus = %self.settings.bus, "connected to systemd again; its signals are followed and the unit was read afresh");
        self.health.set_bus_connected(true);
        self.metrics.bus(true);
        let since = self.clock.format(Instant::now());
        self.status.send_modify(|d| {
            d.bus.connected = true;
            d.bus.since = since;
            d.bus.reconnects += 1;
        });
        // A restart that waited for the bus is tried now.
        if let Some((_, at)) = &mut self.deferred {
            *at = Instant::now();
        }
    }

    /// Until containerd first answers, asks the kernel whether the listener at `--socket` is
    /// containerd's own: only a stall on that one counts as evidence then.
    fn check_ownership(&mut self) {
        if self.detector.answered() {
            return;
        }
        let now = Instant::now();
        if self
            .ownership_checked
            .is_some_and(|at| now.saturating_duration_since(at) < OWNERSHIP_CHECK_INTERVAL)
        {
            return;
        }
        self.ownership_checked = Some(now);
        let owned = self.main_pid.is_some_and(|pid| {
            tokio::task::block_in_place(|| listener::ownership(&self.settings.socket, pid))
                .is_ok_and(|o| o == Ownership::Owned)
        });
        self.detector.set_listener_owned(owned);
    }

    /// Names a configuration problem while probes fail on a containerd never seen answer,
    /// and clears it once containerd answers.
    fn publish_config_problem(&mut self) {
        let problem = self.detector.unanswered().then(|| self.diagnose_socket());
        if self.status.borrow().config_problem == problem {
            return;
        }
        match &problem {
            Some(p) => {
                warn!(socket = %self.settings.socket.display(), "configuration problem: {p}");
            }
            None => info!("containerd answers on {}", self.settings.socket.display()),
        }
        self.health.set_config_problem(problem.clone());
        self.status.send_modify(|d| d.config_problem = problem);
    }

    /// Why containerd never answered on `--socket`, in words that name the setting to fix.
    fn diagnose_socket(&self) -> String {
        use std::os::unix::fs::FileTypeExt as _;
        let socket = &self.settings.socket;
        let fix = "set --socket (OBSERVER_SOCKET, `socket` in the config file) to the path containerd listens on (`[grpc] address` in its config)";
        let unit = &self.settings.unit;
        let found = match std::fs::metadata(socket) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                format!("nothing exists at --socket {}", socket.display())
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return format!(
                    "the observer may not reach --socket {} (permission denied): run it as root or grant it access to the socket's directory; no restart is made until containerd answers there",
                    socket.display()
                );
            }
            Err(e) => format!("--socket {} cannot be read: {e}", socket.display()),
            Ok(m) if !m.file_type().is_socket() => {
                format!("--socket {} is not a socket", socket.display())
            }
            Ok(_) => {
                let owner = self.main_pid.map(|pid| listener::ownership(socket, pid));
                match owner {
                    Some(Ok(Ownership::NoListener)) => {
                        format!("nothing listens on --socket {}", socket.display())
                    }
                    Some(Ok(Ownership::Foreign)) => format!(
                        "the listener on --socket {} is not held by {unit}'s main process (PID {})",
                        socket.display(),
                        self.main_pid.unwrap_or_default()
                    ),
                    _ => {
                        let error = self
                            .status
                            .borrow()
                            .last_probe
                            .as_ref()
                            .and_then(|p| p.error.clone())
                            .unwrap_or_default();
                        format!(
                            "containerd never answered on --socket {} ({error})",
                            socket.display()
                        )
                    }
                }
            }
        };
        format!(
            "{found}, while {unit} runs: {fix}, or --unit to the unit that runs it; no restart is made until containerd answers there"
        )
    }

    /// An operator restarted containerd (a new main PID that neither the observer's restart
    /// nor systemd's own `Restart=` made): the restart budget starts afresh.
    fn note_operator_restart(&mut self, status: &UnitStatus) {
        let Some(new) = status.main_pid else {
            return;
        };
        if let Some((old, restarts_then)) = self.last_known_pid
            && old != new
            && self.restart_in_flight.is_none()
            // systemd counts its own automatic restarts in NRestarts, and resets it on a
            // start or restart someone asked for.
            && status.n_restarts <= restarts_then
        {
            info!(
                old,
                new,
                "containerd was restarted by someone else than the observer or systemd's Restart=: the restart budget starts afresh"
            );
            self.budget.operator_restarted();
            self.deferred = None;
            self.publish_budget();
        }
        self.last_known_pid = Some((new, status.n_restarts));
    }

    /// Reads the clocks; a gap in the observer's own scheduling since the last turn is told
    /// to the detector, recorded, and followed by a fresh probe before anything is judged.
    fn check_schedule(&mut self, results: &mpsc::Sender<ProbeResult>) {
        let Some(gap) = self.schedule.turn(read_clocks()) else {
            return;
        };
        warn!(
            away_ms = millis(gap.length()),
            suspended_ms = millis(gap.suspended),
            "the observer itself was not scheduled for {:.0} ms: probes and pending ages across the gap are discarded, and containerd is probed again before it is judged",
            millis(gap.length())
        );
        self.metrics.scheduling_gap();
        let record = GapRecord {
            at: self.clock.format(gap.from),
            duration_ms: millis(gap.length()),
            suspended_ms: millis(gap.suspended),
        };
        let gaps = self.schedule.gaps();
        self.status.send_modify(|d| {
            d.observer.scheduling_gaps = gaps;
            d.observer.last_scheduling_gap = Some(record);
        });
        let decision = self.detector.observe(
            gap.to,
            Observation::SchedulingGap {
                from: gap.from,
                to: gap.to,
            },
        );
        if decision == Decision::ProbeNow {
            // The probe out now may have left before the gap: this one counts.
            self.start_confirming_probe(results);
        }
    }

    fn set_main_pid(&mut self, pid: Option<u32>) {
        if pid == self.main_pid {
            return;
        }
        info!(old = ?self.main_pid, new = ?pid, "containerd main PID changed");
        self.main_pid = pid;
        // Read at once, while the PID surely names the process systemd just reported.
        self.main_identity = pid.and_then(ProcessIdentity::of);
        self.ownership_checked = None;
        self.detector.set_main_pid(pid);
        self.sensors.follow(pid, self.main_identity);
        // A new containerd may have a new configuration: ask every layer again.
        let now = Instant::now();
        for slot in &mut self.layers {
            slot.unsupported = None;
            slot.next_due = now;
        }
        let records: Vec<LayerRecord> = self.layers.iter().map(LayerSlot::record).collect();
        self.status.send_modify(|d| d.layers = records);
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
        let sender = results.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = probe::probe_version(&socket, timeout) => result,
                () = stop.cancelled() => return,
            };
            let _ = sender.send(result).await;
        });
        self.send_open_probe(results);
    }

    /// Asks over the connection kept open too, unless that probe is still out.
    fn send_open_probe(&mut self, results: &mpsc::Sender<ProbeResult>) {
        if self.open_probe_in_flight {
            return;
        }
        self.open_probe_in_flight = true;
        let socket = self.settings.socket.clone();
        let timeout = self.settings.probe_timeout;
        let results = results.clone();
        let open = self.open_connection.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = open.probe_version(&socket, timeout) => result,
                () = stop.cancelled() => return,
            };
            let _ = results.send(result).await;
        });
    }

    /// When the next deeper layer is due, if any is.
    fn next_layer_due(&self) -> Option<Instant> {
        self.layers.iter().filter_map(LayerSlot::due).min()
    }

    /// Sends the probes of every deeper layer that is due, each in its own task.
    fn start_due_layers(&mut self, results: &mpsc::Sender<LayerResult>) {
        let now = Instant::now();
        for slot in &mut self.layers {
            if slot.due().is_none_or(|due| due > now) {
                continue;
            }
            slot.in_flight = true;
            let ladder = self.ladder.clone();
            let results = results.clone();
            let (layer, deadline) = (slot.layer, slot.timing.deadline);
            tokio::spawn(async move {
                let result = ladder.probe(layer, deadline).await;
                let _ = results.send(result).await;
            });
        }
    }

    fn on_layer(&mut self, result: LayerResult) -> Decision {
        let now = Instant::now();
        let Some(slot) = self.layers.iter_mut().find(|s| s.layer == result.layer) else {
            return Decision::Wait;
        };
        slot.in_flight = false;
        // Periods count from each probe's start, so a slow answer does not stretch them.
        slot.next_due = (result.started + slot.timing.period).max(now);
        let name = result.outcome.name();
        self.metrics
            .layer_probe(result.layer.name(), name, result.latency);
        let (detail, silent_tasks) = match &result.outcome {
            LayerOutcome::Answered {
                detail,
                silent_tasks,
            } => (detail.clone(), silent_tasks.clone()),
            LayerOutcome::Unsupported(why) | LayerOutcome::Failed(_, why) => {
                (why.clone(), Vec::new())
            }
        };
        if let LayerOutcome::Unsupported(why) = &result.outcome {
            if slot.explicit {
                warn!(layer = %result.layer, "{why}: a configuration fact, not a hang; the layer is not probed until containerd restarts");
            } else {
                info!(layer = %result.layer, "{why}; the layer is left out until containerd restarts");
            }
            slot.unsupported = Some(why.clone());
        }
        let mut record = slot.record();
        record.last = Some(LayerProbeRecord {
            at: humantime::format_rfc3339_micros(result.started_wall).to_string(),
            latency_ms: millis(result.latency),
            result: name,
            detail,
            silent_tasks: silent_tasks.clone(),
        });
        self.status.send_modify(|d| {
            if let Some(entry) = d.layers.iter_mut().find(|l| l.layer == result.layer) {
                *entry = record;
            }
        });
        let observation = match result.outcome {
            LayerOutcome::Answered { .. } => Observation::LayerAnswered {
                layer: result.layer,
                latency: result.latency,
                silent_tasks,
            },
            LayerOutcome::Unsupported(_) => return Decision::Wait,
            LayerOutcome::Failed(failure, error) => Observation::LayerFailed {
                layer: result.layer,
                started: result.started,
                failure,
                error,
            },
        };
        self.detector.observe(now, observation)
    }

    /// Samples containerd's and its shims' threads for D state.
    fn sample_blocked(&mut self) -> Decision {
        let now = Instant::now();
        let (sample, sensor) = self.sensors.sample_blocked(now);
        let threshold = self.settings.blocked_threshold;
        let past = |owner| {
            sample
                .threads
                .iter()
                .filter(|t| t.owner == owner && t.blocked_for >= threshold)
                .count()
        };
        self.metrics
            .blocked(past(Owner::Containerd), past(Owner::Shim));
        let (threads, pressure) = (sample.threads.clone(), sample.context.clone());
        self.status.send_if_modified(|d| {
            let changed =
                d.blocked_threads.threads != threads || d.blocked_threads.pressure != pressure;
            d.blocked_threads.threads = threads;
            d.blocked_threads.pressure = pressure;
            changed
        });
        self.detector.observe(
            now,
            Observation::Blocked {
                threads: sample.threads,
                context: sample.context,
                sensor,
            },
        )
    }

    fn on_probe(&mut self, result: ProbeResult) -> Decision {
        let channel = result.channel;
        match channel {
            ProbeChannel::Fresh => self.probes_in_flight = self.probes_in_flight.saturating_sub(1),
            ProbeChannel::Open => self.open_probe_in_flight = false,
        }
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
        // The observer's own exhaustion is reported as its own, and clears at the next probe
        // that reached containerd, whatever containerd answered.
        let degraded = match &result.outcome {
            Err((ProbeFailure::ObserverSide, why)) => Some(why.clone()),
            _ => None,
        };
        if degraded.is_some() != self.health.degraded().is_some() {
            match &degraded {
                Some(why) => warn!("observer degraded, containerd not judged meanwhile: {why}"),
                None => info!("observer no longer degraded: probes reach containerd again"),
            }
            let degraded_record = degraded.as_ref().map(|why| DegradedRecord {
                since: humantime::format_rfc3339_seconds(result.started_wall).to_string(),
                reason: why.clone(),
            });
            self.status
                .send_modify(|d| d.observer.degraded = degraded_record);
        }
        self.metrics.set_degraded(degraded.is_some());
        self.health.set_degraded(degraded);
        if channel == ProbeChannel::Open {
            self.status.send_modify(|d| d.open_probe = Some(record));
        } else {
            let version = record.version.clone();
            self.metrics.probe(&record.result, result.latency);
            self.status.send_modify(|d| {
                d.last_probe = Some(record);
                if version.is_some() {
                    d.containerd_version = version;
                }
            });
            if !matches!(result.outcome, Err((ProbeFailure::ObserverSide, _))) {
                self.budget
                    .observe_health(Instant::now(), result.outcome.is_ok());
            }
            if result.outcome.is_ok() {
                self.deferred = None;
            }
        }
        let observation = match result.outcome {
            Ok(version) => Observation::ProbeSucceeded {
                latency: result.latency,
                version,
                channel,
            },
            Err((failure, error)) => Observation::ProbeFailed {
                started: result.started,
                failure,
                error,
                channel,
            },
        };
        let decision = self.detector.observe(Instant::now(), observation);
        self.publish_config_problem();
        let failed = self.detector.failed_probes();
        self.status.send_if_modified(|d| {
            let changed = d.failed_probes != failed;
            d.failed_probes = failed;
            changed
        });
        decision
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
        let cause = (exit.source == Source::Ebpf)
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
        let decision = self.detector.observe(
            now,
            Observation::Pending {
                count: snapshot.count,
                oldest_age: snapshot.oldest_age,
                accepted: snapshot.accepted,
                sensor: source,
            },
        );
        let progress = self.detector.accept_progress(now);
        let record = PendingRecord {
            count: snapshot.count,
            oldest_age_ms: snapshot.oldest_age.map(millis),
            source: Some(source),
            accepted_per_s: progress.per_second,
            last_accept_ago_ms: progress.last_accept_ago.map(millis),
        };
        self.status.send_modify(|d| d.pending_connections = record);
        self.metrics.pending(snapshot.count, snapshot.oldest_age);
        self.metrics.accept_rate(progress.per_second);
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
            kill_hung_shims: self.settings.kill_hung_shims,
        };
        self.status.send_modify(|d| d.paused = switches.paused);
        let now = Instant::now();
        let action = policy::decide(
            &verdict,
            self.restart_in_flight.is_some(),
            switches,
            &mut self.budget,
            now,
        );
        let Some(systemd) = self.systemd.clone().filter(|_| action == Action::Restart) else {
            if action == Action::Restart {
                // Without systemd nothing can be restarted: try again once it is back.
                warn!(unit = %self.settings.unit, reason = ?verdict.state, "containerd needs a restart, but systemd cannot be reached; waiting for the bus");
                self.deferred = Some((verdict, now + RECONNECT_BACKOFF.1));
                return;
            }
            return self.record_declined(action, verdict, now);
        };
        self.start_restart(systemd, verdict, now, done);
    }

    /// Records an action that did not restart (paused, dry run, backing off, giving up).
    fn record_declined(&mut self, action: Action, verdict: Verdict, now: Instant) {
        let result = match &action {
            Action::Wait | Action::Restart => return,
            Action::Paused => format!(
                "paused by {}: not restarting {}",
                self.settings.pause_file.display(),
                self.settings.unit
            ),
            Action::DryRun => format!("dry run: would restart {}", self.settings.unit),
            Action::Report { why } => why.clone(),
            Action::ReportWithDump { why } => self.dump_stacks(why),
            Action::KillShims { pids } => kill_shims(pids),
            Action::BackOff {
                retry_in,
                recent_restarts,
            } => {
                self.deferred = Some((verdict.clone(), now + *retry_in));
                format!(
                    "backing off: {recent_restarts} restart(s) recently; next attempt in {:.0} s",
                    retry_in.as_secs_f64()
                )
            }
            Action::GiveUp { recent_restarts } => {
                self.deferred = None;
                format!(
                    "gave up: {recent_restarts} restarts within {:.0} min; no more until containerd is healthy again",
                    budget_config(self.settings).window.as_secs_f64() / 60.0
                )
            }
        };
        self.record_action(action.name(), &verdict, result, true);
        if matches!(action, Action::BackOff { .. } | Action::GiveUp { .. }) {
            self.publish_budget();
        }
    }

    /// Hands a restart to the actuator's task. The task is bounded: it always reports back,
    /// even when a step hangs or panics, so a restart is never "in flight" for good.
    fn start_restart(
        &mut self,
        systemd: Systemd,
        verdict: Verdict,
        now: Instant,
        done: &mpsc::Sender<ActionResult>,
    ) {
        self.deferred = None;
        self.open_connection.forget();
        self.detector
            .observe(Instant::now(), Observation::RestartStarted);
        self.status.send_modify(|d| d.state = State::Recovering);
        self.restart_in_flight = Some((verdict.clone(), now));
        let config = self.actuator.clone();
        let done = done.clone();
        let dead_pid = (verdict.state == State::Crashed)
            .then_some(verdict.pid)
            .flatten();
        let main = self.main_identity;
        // Every step inside has its own deadline; this one bounds them all together.
        let limit = config.settle + config.stack_dump_wait + config.job_timeout + CALL_DEADLINE * 6;
        tokio::spawn(async move {
            let steps = carry_out(systemd, config, verdict.state, dead_pid, main);
            let result = bounded(limit, steps).await.unwrap_or_else(actuator_failed);
            let _ = done.send(result).await;
        });
    }

    /// Asks containerd for its goroutine dump (in the background: it waits for the file) and
    /// says where it goes.
    fn dump_stacks(&self, why: &str) -> String {
        if !self.settings.dump_stacks {
            return format!("{why} (no goroutine dump: --no-stack-dump)");
        }
        let (Some(systemd), Some(main)) = (self.systemd.clone(), self.main_identity) else {
            return format!(
                "{why}; no process to ask for a goroutine dump now: the one taken before the restart is in restarts[].stack_dump"
            );
        };
        let config = self.actuator.clone();
        tokio::spawn(async move {
            let dump = restart::prepare(&systemd, &config, State::StartupHung, Some(main)).await;
            if let Some(dump) = dump {
                info!(
                    pid = main.pid,
                    "goroutine dump of a containerd hanging at start: {}", dump.note
                );
            }
        });
        format!(
            "{why}; goroutine dump requested (SIGUSR1): containerd writes it to its log and /tmp/containerd.{}.stacks.log",
            main.pid
        )
    }

    /// Tries again a restart the budget (or a lost bus) deferred, if containerd still needs one.
    fn retry_deferred(&mut self) -> Decision {
        let Some((verdict, _)) = self.deferred.take() else {
            return Decision::Wait;
        };
        if policy::needs_restart(self.detector.state()) {
            Decision::Act(verdict)
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
        // Asked for before the restart; the note says where it went, or why there is none.
        let dump = outcome
            .stack_dump
            .as_ref()
            .map(|note| format!("; goroutine dump before it: {note}"))
            .unwrap_or_default();
        let summary = if outcome.succeeded() {
            format!(
                "restarted {} through systemd: job {} in {:.0} ms, new PID {}{}{dump}",
                self.settings.unit,
                outcome.job_result,
                millis(outcome.duration),
                outcome.new_pid.map_or("unknown".into(), |p| p.to_string()),
                outcome
                    .escalation
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        } else {
            format!(
                "restart of {} failed: job {}{}{dump}",
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
        // The new process is the observer's doing, not an operator's.
        if let Some(new) = outcome.new_pid {
            self.last_known_pid = Some((new, result.unit.n_restarts));
        }
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
            escalation: outcome.escalation,
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

/// `CLOCK_MONOTONIC` (as [`Instant`]) and `CLOCK_BOOTTIME`, read together.
fn read_clocks() -> Reading {
    let monotonic = Instant::now();
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into memory this function owns.
    let boottime = if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) } == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        // Without it only late ticks are seen; the monotonic clock stands in.
        monotonic.elapsed()
    };
    Reading {
        monotonic,
        boottime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_actuator_that_hangs_or_panics_still_reports_back() {
        let limit = Duration::from_millis(100);
        assert_eq!(bounded(limit, async { 7 }).await, Ok(7));
        let hung = bounded(limit, std::future::pending::<()>()).await;
        assert!(hung.unwrap_err().contains("did not finish within 100ms"));
        let panicked = bounded(limit, async { panic!("a bug in a step") }).await;
        let error: Result<(), String> = panicked;
        assert!(error.unwrap_err().contains("panicked"));
        // What the loop makes of it: a failed restart, so nothing stays in flight.
        let result = actuator_failed("the actuator failed: boom".into());
        assert!(!result.restart.expect("an outcome").succeeded());
    }
}
