//! The agent's Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! The agent records into [`Metrics`] where it records the same facts into the status
//! document; the HTTP handler only encodes. Every name starts with `containerd_observer_`,
//! durations are in seconds, and counters get their `_total` suffix from the encoder.
//! Label values come from small fixed sets, so no series is created per PID or per error text.

use std::{
    sync::atomic::{AtomicI64, AtomicU64},
    time::Duration,
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

use crate::{judge::cause::ExitCause, judge::detector::State};

/// Prefix of every metric name.
pub const PREFIX: &str = "containerd_observer";
/// The `Content-Type` of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every state the detector can be in, for the state gauge; kept complete by
/// [`state_label`]'s exhaustive match and a test.
pub const ALL_STATES: [State; 12] = [
    State::Starting,
    State::Healthy,
    State::Suspect,
    State::Overloaded,
    State::Crashed,
    State::Hung,
    State::Unreachable,
    State::Recovering,
    State::Stopped,
    State::Degraded,
    State::StorageStalled,
    State::StartupHung,
];

/// The actuator's actions, as the status document's `actions` names them.
const ACTIONS: [&str; 12] = [
    "restart",
    "report",
    "report_with_dump",
    "kill_shims",
    "leave_to_systemd",
    "leave_stopped",
    "leave_frozen",
    "refused_by_systemd",
    "back_off",
    "give_up",
    "dry_run",
    "paused",
];

/// Bucket bounds of the probe latency, in seconds: a healthy `Version()` takes about a
/// millisecond, and the probe deadline is about a second.
const PROBE_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of the accept latency, in seconds: containerd accepts in microseconds
/// when well and not at all when its accept loop is stuck.
const ACCEPT_BUCKETS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// Bucket bounds of a deeper layer's latency, in seconds: the layers' deadlines are a few
/// seconds, and `Tasks.List` waits up to 2 s per silent shim.
const LAYER_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn layer_histogram() -> Histogram {
    Histogram::new(LAYER_BUCKETS)
}

type Labels1 = [(&'static str, String); 1];
type Labels2 = [(&'static str, String); 2];

/// The metric handles and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    probe_latency: Histogram,
    probes: Family<Labels1, Counter>,
    accept_latency: Histogram,
    pending_connections: Gauge<i64, AtomicI64>,
    oldest_pending_age: Gauge<f64, AtomicU64>,
    accept_rate: Gauge<f64, AtomicU64>,
    scheduling_gaps: Counter,
    exits: Family<Labels1, Counter>,
    verdicts: Family<Labels1, Counter>,
    restarts: Family<Labels2, Counter>,
    actions: Family<Labels1, Counter>,
    state: Family<Labels1, Gauge<i64, AtomicI64>>,
    bus_connected: Gauge<i64, AtomicI64>,
    bus_reconnects: Counter,
    layer_latency: Family<Labels1, Histogram, fn() -> Histogram>,
    layer_probes: Family<Labels2, Counter>,
    blocked_threads: Family<Labels1, Gauge<i64, AtomicI64>>,
    degraded: Gauge<i64, AtomicI64>,
    status_connections: Gauge<i64, AtomicI64>,
    status_connections_shed: Counter,
    status_accept_errors: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let probe_latency = Histogram::new(PROBE_BUCKETS);
        registry.register_with_unit(
            "probe_latency",
            "Time containerd took to answer a Version() probe, or until the probe failed",
            Unit::Seconds,
            probe_latency.clone(),
        );
        let probes = Family::<Labels1, Counter>::default();
        registry.register(
            "probes",
            "Version() probes by result: ok, timeout, refused, error, or observer_side (the observer's own limits kept the probe from containerd; no evidence about it)",
            probes.clone(),
        );
        let accept_latency = Histogram::new(ACCEPT_BUCKETS);
        registry.register_with_unit(
            "accept_latency",
            "Time connections waited in containerd's accept queue before it accepted them",
            Unit::Seconds,
            accept_latency.clone(),
        );
        let pending_connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "pending_connections",
            "Connections waiting in containerd's accept queue at the last sample",
            pending_connections.clone(),
        );
        let oldest_pending_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest connection waiting in containerd's accept queue (0 when none waits)",
            Unit::Seconds,
            oldest_pending_age.clone(),
        );
        let accept_rate = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "accept_rate",
            "Connections per second containerd took off its accept queue after they had waited in it (over the last 5 s): its accept loop's progress",
            accept_rate.clone(),
        );
        let scheduling_gaps = Counter::default();
        registry.register(
            "scheduling_gaps",
            "Gaps in the observer's own scheduling (a late tick, or a suspended machine); probes and pending ages across them are discarded",
            scheduling_gaps.clone(),
        );
        let exits = Family::<Labels1, Counter>::default();
        registry.register(
            "exits",
            "Exits of containerd's main process by cause: oom_kill, a signal name such as sigkill, exit_success, exit_failure or unknown",
            exits.clone(),
        );
        let verdicts = Family::<Labels1, Counter>::default();
        registry.register(
            "verdicts",
            "Verdicts the detector reached, by the state they judged containerd to be in",
            verdicts.clone(),
        );
        let restarts = Family::<Labels2, Counter>::default();
        registry.register(
            "restarts",
            "Restarts of containerd's unit by the verdict that triggered them and systemd's job result (or dry_run, error, interrupted)",
            restarts.clone(),
        );
        let actions = Family::<Labels1, Counter>::default();
        registry.register(
            "actions",
            "Decisions the actuator carried out or declined: restart, leave_to_systemd, leave_stopped, leave_frozen, refused_by_systemd, back_off, give_up, dry_run or paused",
            actions.clone(),
        );
        let state = Family::<Labels1, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "state",
            "The detector's judgement of containerd: 1 for the current state, 0 for the others",
            state.clone(),
        );
        let bus_connected = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "bus_connected",
            "1 while the observer is connected to systemd over D-Bus and can restart containerd, 0 while it reconnects",
            bus_connected.clone(),
        );
        bus_connected.set(1);
        let bus_reconnects = Counter::default();
        registry.register(
            "bus_reconnects",
            "Connections to systemd over D-Bus made again after one was lost (a restart of the bus, systemd's daemon-reexec)",
            bus_reconnects.clone(),
        );
        let layer_latency =
            Family::<Labels1, Histogram, fn() -> Histogram>::new_with_constructor(layer_histogram);
        registry.register_with_unit(
            "layer_probe_latency",
            "Time a layer of the probe ladder took to answer, or until it failed, by layer",
            Unit::Seconds,
            layer_latency.clone(),
        );
        let layer_probes = Family::<Labels2, Counter>::default();
        registry.register(
            "layer_probes",
            "Probes of the ladder's deeper layers by layer and result: ok, timeout, refused, error or unsupported",
            layer_probes.clone(),
        );
        let blocked_threads = Family::<Labels1, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "blocked_threads",
            "Threads of containerd (owner=containerd) and its shims (owner=shim) in D state past the threshold at the last sample",
            blocked_threads.clone(),
        );
        for owner in ["containerd", "shim"] {
            let _ = blocked_threads.get_or_create(&[("owner", owner.to_owned())]);
        }
        let degraded = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "degraded",
            "1 while the observer's own limits (descriptors, memory) keep its probes from reaching containerd, which is then not judged; 0 otherwise",
            degraded.clone(),
        );
        let status_connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "status_connections",
            "Connections open to the status endpoint",
            status_connections.clone(),
        );
        let status_connections_shed = Counter::default();
        registry.register(
            "status_connections_shed",
            "Idle or unfinished connections to the status endpoint closed to make room for a new one at the connection cap",
            status_connections_shed.clone(),
        );
        let status_accept_errors = Counter::default();
        registry.register(
            "status_accept_errors",
            "Connections the status endpoint could not accept (the observer's descriptors ran out)",
            status_accept_errors.clone(),
        );
        registry.register(
            "build",
            "The observer's build",
            Info::new([("version", env!("CARGO_PKG_VERSION").to_owned())]),
        );
        // Known label values start at zero, so rates and alerts work before the first event.
        for result in ["ok", "timeout", "refused", "error", "observer_side"] {
            let _ = probes.get_or_create(&[("result", result.to_owned())]);
        }
        for s in ALL_STATES {
            let _ = state.get_or_create(&[("state", state_label(s).to_owned())]);
        }
        for s in [State::Crashed, State::Hung, State::Unreachable] {
            let _ = verdicts.get_or_create(&[("verdict", state_label(s).to_owned())]);
            let _ = restarts.get_or_create(&[
                ("trigger", state_label(s).to_owned()),
                ("result", "done".to_owned()),
            ]);
        }
        for cause in ["sigkill", "oom_kill", "exit_failure", "unknown"] {
            let _ = exits.get_or_create(&[("cause", cause.to_owned())]);
        }
        for action in ACTIONS {
            let _ = actions.get_or_create(&[("action", action.to_owned())]);
        }
        let metrics = Self {
            registry,
            probe_latency,
            probes,
            accept_latency,
            pending_connections,
            oldest_pending_age,
            accept_rate,
            scheduling_gaps,
            exits,
            verdicts,
            restarts,
            actions,
            state,
            bus_connected,
            bus_reconnects,
            layer_latency,
            layer_probes,
            blocked_threads,
            degraded,
            status_connections,
            status_connections_shed,
            status_accept_errors,
        };
        metrics.set_state(State::Starting);
        metrics
    }

    /// The connection to systemd was lost (`false`) or made again (`true`).
    pub fn bus(&self, connected: bool) {
        self.bus_connected.set(i64::from(connected));
        if connected {
            self.bus_reconnects.inc();
        }
    }

    /// A finished probe: `result` is the status document's `ok`, `timeout`, `refused` or `error`.
    pub fn probe(&self, result: &str, latency: Duration) {
        self.probe_latency.observe(latency.as_secs_f64());
        self.probes
            .get_or_create(&[("result", result.to_owned())])
            .inc();
    }

    /// A finished probe of a deeper layer; `result` as in its `/status` record.
    pub fn layer_probe(&self, layer: &str, result: &str, latency: Duration) {
        self.layer_latency
            .get_or_create(&[("layer", layer.to_owned())])
            .observe(latency.as_secs_f64());
        self.layer_probes
            .get_or_create(&[("layer", layer.to_owned()), ("result", result.to_owned())])
            .inc();
    }

    /// Makes every result of `layer` a series at zero, so alerts work before the first failure.
    pub fn layer_enabled(&self, layer: &str) {
        let _ = self
            .layer_latency
            .get_or_create(&[("layer", layer.to_owned())]);
        for result in ["ok", "timeout", "refused", "error", "unsupported"] {
            let _ = self
                .layer_probes
                .get_or_create(&[("layer", layer.to_owned()), ("result", result.to_owned())]);
        }
    }

    /// Threads in D state past the threshold at the last sample, by owner.
    pub fn blocked(&self, containerd: usize, shims: usize) {
        for (owner, n) in [("containerd", containerd), ("shim", shims)] {
            self.blocked_threads
                .get_or_create(&[("owner", owner.to_owned())])
                .set(n as i64);
        }
    }

    /// One connection that containerd accepted after waiting `latency` in its queue.
    pub fn accept(&self, latency: Duration) {
        self.accept_latency.observe(latency.as_secs_f64());
    }

    /// The latest sample of the accept queue.
    pub fn pending(&self, count: u32, oldest_age: Option<Duration>) {
        self.pending_connections.set(i64::from(count));
        self.oldest_pending_age
            .set(oldest_age.map_or(0.0, |a| a.as_secs_f64()));
    }

    /// The accept loop's progress: connections taken off the queue per second.
    pub fn accept_rate(&self, per_second: f64) {
        self.accept_rate.set(per_second);
    }

    /// A gap in the observer's own scheduling.
    pub fn scheduling_gap(&self) {
        self.scheduling_gaps.inc();
    }

    /// An exit of containerd's main process; `cause` is `None` when the sensor cannot tell.
    pub fn exit(&self, cause: Option<&ExitCause>) {
        self.exits
            .get_or_create(&[("cause", exit_cause_label(cause))])
            .inc();
    }

    pub fn verdict(&self, state: State) {
        self.verdicts
            .get_or_create(&[("verdict", state_label(state).to_owned())])
            .inc();
    }

    /// A restart that finished (or was skipped or cut short): `trigger` is the verdict that
    /// asked for it, `result` systemd's job result or `dry_run`, `error`, `interrupted`.
    pub fn restart(&self, trigger: State, result: &str) {
        self.restarts
            .get_or_create(&[
                ("trigger", state_label(trigger).to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    /// An action of the actuator, as the status document's `actions` names it.
    pub fn action(&self, action: &str) {
        self.actions
            .get_or_create(&[("action", action.to_owned())])
            .inc();
    }

    pub fn set_state(&self, current: State) {
        for s in ALL_STATES {
            self.state
                .get_or_create(&[("state", state_label(s).to_owned())])
                .set(i64::from(s == current));
        }
    }

    /// Whether the observer's own limits keep its probes from containerd.
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.set(i64::from(degraded));
    }

    /// Connections open to the status endpoint now.
    pub fn set_status_connections(&self, open: usize) {
        self.status_connections
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// A status connection closed to make room at the cap.
    pub fn status_connection_shed(&self) {
        self.status_connections_shed.inc();
    }

    /// A connection the status endpoint could not accept.
    pub fn status_accept_error(&self) {
        self.status_accept_errors.inc();
    }

    /// The OpenMetrics text exposition, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The label value of a state: its name in the status document.
pub fn state_label(state: State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Healthy => "healthy",
        State::Suspect => "suspect",
        State::Overloaded => "overloaded",
        State::Crashed => "crashed",
        State::Hung => "hung",
        State::Unreachable => "unreachable",
        State::Recovering => "recovering",
        State::Stopped => "stopped",
        State::Degraded => "degraded",
        State::StorageStalled => "storage_stalled",
        State::StartupHung => "startup_hung",
    }
}

/// A bounded label for an exit's cause.
fn exit_cause_label(cause: Option<&ExitCause>) -> String {
    match cause {
        Some(c) if c.oom_killed => "oom_kill".into(),
        Some(ExitCause {
            signal_name: Some(name),
            ..
        }) => name.to_ascii_lowercase(),
        Some(ExitCause {
            signal: Some(n), ..
        }) => format!("signal_{n}"),
        Some(ExitCause {
            status: Some(0), ..
        }) => "exit_success".into(),
        Some(ExitCause {
            status: Some(_), ..
        }) => "exit_failure".into(),
        _ => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
    }

    #[test]
    fn state_labels_match_the_status_document() {
        for s in ALL_STATES {
            assert_eq!(serde_json::to_value(s).unwrap(), state_label(s));
        }
    }

    #[test]
    fn exposition_names_units_and_suffixes() {
        let m = Metrics::new();
        m.probe("ok", Duration::from_millis(3));
        m.probe("timeout", Duration::from_secs(1));
        m.accept(Duration::from_micros(20));
        m.pending(2, Some(Duration::from_millis(1500)));
        m.verdict(State::Crashed);
        m.restart(State::Crashed, "done");
        m.set_state(State::Recovering);
        m.exit(None);
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE containerd_observer_probe_latency_seconds histogram"));
        assert!(text.contains("# UNIT containerd_observer_probe_latency_seconds seconds"));
        assert_eq!(
            sample(
                &text,
                "containerd_observer_probes_total{result=\"timeout\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                "containerd_observer_probes_total{result=\"refused\"}"
            ),
            Some("0")
        );
        assert_eq!(
            sample(&text, "containerd_observer_oldest_pending_age_seconds"),
            Some("1.5")
        );
        assert_eq!(
            sample(
                &text,
                "containerd_observer_restarts_total{trigger=\"crashed\",result=\"done\"}"
            ),
            Some("1")
        );
        assert_eq!(
            sample(&text, "containerd_observer_state{state=\"recovering\"}"),
            Some("1")
        );
        assert_eq!(
            sample(&text, "containerd_observer_state{state=\"starting\"}"),
            Some("0")
        );
        assert_eq!(
            sample(&text, "containerd_observer_exits_total{cause=\"unknown\"}"),
            Some("1")
        );
        let info = format!(
            "containerd_observer_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &info), Some("1"));
    }

    #[test]
    fn exit_causes_are_few_and_named() {
        let base = ExitCause {
            status: None,
            signal: None,
            signal_name: None,
            core_dumped: false,
            sender_pid: None,
            sender_comm: None,
            oom_killed: false,
        };
        let kill = ExitCause {
            signal: Some(9),
            signal_name: Some("SIGKILL"),
            ..base.clone()
        };
        assert_eq!(exit_cause_label(Some(&kill)), "sigkill");
        let oom = ExitCause {
            oom_killed: true,
            ..kill
        };
        assert_eq!(exit_cause_label(Some(&oom)), "oom_kill");
        let ok = ExitCause {
            status: Some(0),
            ..base.clone()
        };
        assert_eq!(exit_cause_label(Some(&ok)), "exit_success");
        let failed = ExitCause {
            status: Some(1),
            ..base.clone()
        };
        assert_eq!(exit_cause_label(Some(&failed)), "exit_failure");
        assert_eq!(exit_cause_label(Some(&base)), "unknown");
        assert_eq!(exit_cause_label(None), "unknown");
    }
}
