//! The status document: what the agent has seen and done, as served at `GET /status`.
//!
//! - [`server`]: the HTTP endpoint (`/status`, `/livez`, `/readyz`, `/metrics`);
//! - [`client`]: `observer status` fetching it;
//! - [`summary`]: the short text it prints for people.
//!
//! The agent owns the document and updates it through a `watch` channel; the HTTP handlers
//! only read. Times are wall-clock RFC 3339 strings; durations are milliseconds.

pub mod client;
pub mod server;
pub mod summary;

pub use client::{FetchError, fetch};
pub use server::{Endpoint, RefreshRequest, bind_unix};
pub use summary::summary;

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::judge::{
    detector::{self, Source, State},
    layer::{BlockedThread, Layer, SilentTask},
};

/// How many verdicts and restarts the document keeps.
pub const HISTORY: usize = 100;

/// The JSON document served at `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusDocument {
    /// The agent itself.
    pub observer: ObserverRecord,
    /// The detector's judgement of containerd right now.
    pub state: State,
    pub unit: String,
    pub containerd_pid: Option<u32>,
    pub containerd_version: Option<String>,
    /// `fused` (kernel sensors and probes) or `polling_only`.
    pub mode: &'static str,
    pub dry_run: bool,
    pub sensors: Sensors,
    /// The latest `Version()` probe over a fresh connection.
    pub last_probe: Option<ProbeRecord>,
    /// The latest `Version()` probe over the connection kept open between probes.
    pub open_probe: Option<ProbeRecord>,
    /// Consecutive failed fresh-connection probes in the episode under way: counted, not
    /// listed, however long it lasts.
    pub failed_probes: u32,
    /// Connections waiting in containerd's accept queue now.
    pub pending_connections: PendingRecord,
    /// How long connections waited before containerd accepted them, over a sliding window.
    pub accept_latency: Option<LatencyRecord>,
    pub heartbeat: HeartbeatRecord,
    /// The last exit of containerd's main process that a sensor saw, with its cause.
    pub last_exit: Option<ExitRecord>,
    pub verdicts: VecDeque<VerdictRecord>,
    pub restarts: VecDeque<RestartRecord>,
    /// Every decision the actuator carried out or declined, newest last.
    pub actions: VecDeque<ActionRecord>,
    /// systemd's view of the unit at the last look.
    pub unit_state: crate::act::systemd::UnitStatus,
    /// Whether the actuator may restart now, is backing off, or gave up.
    pub restart_budget: BudgetRecord,
    /// The pause switch: while set, the agent judges and records but never acts.
    pub paused: bool,
    /// The connection to systemd over D-Bus.
    pub bus: BusRecord,
    /// A setting that keeps the observer from watching containerd, and how to fix it: no
    /// restart is made on the evidence it spoils.
    pub config_problem: Option<String>,
    /// The probe ladder, one entry per layer, with its last result.
    pub layers: Vec<LayerRecord>,
    /// containerd's and its shims' threads in D state at the last sample.
    pub blocked_threads: BlockedRecord,
}

/// The agent's connection to systemd.
#[derive(Debug, Clone, Serialize)]
pub struct BusRecord {
    /// Whether systemd can be reached: restarts are possible.
    pub connected: bool,
    /// Since when the connection has been in that state.
    pub since: String,
    /// Connections made again after one was lost.
    pub reconnects: u64,
    /// Why the last connection was lost or the last attempt failed.
    pub last_error: Option<String>,
}

/// One layer of the probe ladder.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRecord {
    pub layer: Layer,
    /// `on`, `off` (left out of --probes) or `unsupported` (this containerd does not serve
    /// it; `reason` says why).
    pub state: &'static str,
    pub reason: Option<String>,
    pub period_ms: f64,
    pub deadline_ms: f64,
    pub last: Option<LayerProbeRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerProbeRecord {
    pub at: String,
    pub latency_ms: f64,
    /// `ok`, `timeout`, `refused`, `error` or `unsupported`.
    pub result: &'static str,
    pub detail: String,
    /// For `tasks`: the tasks whose shim did not answer.
    pub silent_tasks: Vec<SilentTask>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BlockedRecord {
    /// `ebpf`: timed by the `sched_switch` program; `procfs`: sampled from /proc.
    pub source: &'static str,
    pub interval_ms: f64,
    pub threshold_ms: f64,
    pub threads: Vec<BlockedThread>,
    /// The unit cgroup's io and memory pressure when a thread is blocked.
    pub pressure: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObserverRecord {
    pub version: &'static str,
    pub pid: u32,
    pub started_at: String,
    /// Gaps in the observer's own scheduling so far (a late tick, a suspended machine).
    pub scheduling_gaps: u64,
    pub last_scheduling_gap: Option<GapRecord>,
    /// Set while the observer's own limits (descriptors, memory) keep its probes from
    /// reaching containerd: containerd is not judged meanwhile.
    pub degraded: Option<DegradedRecord>,
}

/// Why and since when the observer is degraded.
#[derive(Debug, Clone, Serialize)]
pub struct DegradedRecord {
    pub since: String,
    pub reason: String,
}

/// A stretch in which the observer itself did not run; what expired across it was discarded.
#[derive(Debug, Clone, Serialize)]
pub struct GapRecord {
    /// When it began.
    pub at: String,
    /// How long the observer was away.
    pub duration_ms: f64,
    /// How much of it the machine was suspended (`CLOCK_BOOTTIME` ahead of `CLOCK_MONOTONIC`).
    pub suspended_ms: f64,
}

impl ObserverRecord {
    /// This process, starting now.
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            scheduling_gaps: 0,
            last_scheduling_gap: None,
            degraded: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionRecord {
    pub at: String,
    /// `restart`, `leave_to_systemd`, `leave_stopped`, `leave_frozen`, `refused_by_systemd`, `back_off`,
    /// `give_up`, `dry_run` or `paused`.
    pub action: &'static str,
    /// The verdict that asked for it.
    pub reason: State,
    pub evidence: Vec<String>,
    /// What came of it, in words.
    pub result: String,
    /// How many times in a row this same action was taken (repeats are folded).
    pub count: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetRecord {
    #[serde(flatten)]
    pub allowance: judge::budget::Allowance,
    pub recent_restarts: usize,
    pub max_restarts: usize,
    pub window_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sensors {
    pub process_exit: SensorStatus,
    pub exit_cause: SensorStatus,
    pub accept_queue: SensorStatus,
    pub blocked_threads: SensorStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct SensorStatus {
    /// `on` (eBPF), `fallback` (a mechanism without eBPF stands in) or `off`.
    pub state: &'static str,
    /// The kernel hook (or other mechanism) the sensor uses.
    pub hook: String,
    /// The kind of eBPF hook while the sensor is on: `fentry` (fentry/fexit), `tp_btf` or
    /// `tracepoint`; null for a fallback.
    pub path: Option<&'static str>,
    /// Why the sensor is not on, when it is not.
    pub reason: Option<String>,
    /// What the sensor cannot see on this kernel, while it runs.
    pub notes: Vec<String>,
    /// Cost of each of its eBPF programs (BPF stats).
    pub programs: Vec<ProgramRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgramRecord {
    pub name: &'static str,
    pub run_count: u64,
    pub run_time_ms: f64,
    pub avg_run_ns: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PendingRecord {
    pub count: u32,
    pub oldest_age_ms: Option<f64>,
    /// `ebpf` or `sock_diag`; null when no sensor watches the queue.
    pub source: Option<Source>,
    /// The accept loop's progress: connections per second taken off the queue after they
    /// had waited in it, over the last 5 s.
    pub accepted_per_s: f64,
    /// How long ago containerd last took a waiting connection off the queue.
    pub last_accept_ago_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRecord {
    pub window_s: f64,
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeartbeatRecord {
    pub interval_ms: f64,
    pub sent: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExitRecord {
    pub at: String,
    pub pid: u32,
    pub source: Source,
    pub description: String,
    pub cause: Option<judge::cause::ExitCause>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeRecord {
    pub at: String,
    pub latency_ms: f64,
    /// `ok`, `timeout`, `refused` or `error`.
    pub result: String,
    pub version: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerdictRecord {
    pub at: String,
    pub state: State,
    pub pid: Option<u32>,
    /// From the first sign to this verdict.
    pub detection_latency_ms: f64,
    pub evidence: Vec<EvidenceRecord>,
    /// The probe layer that failed, for a verdict of the ladder.
    pub layer: Option<Layer>,
    /// Verdicts of this state in a row without containerd answering (startup hangs).
    pub repeat: u32,
    /// For a degraded containerd: the tasks whose shims do not answer.
    pub silent_tasks: Vec<SilentTask>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvidenceRecord {
    pub source: Source,
    pub at: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestartRecord {
    pub at: String,
    /// The verdict that asked for it.
    pub reason: State,
    pub old_pid: Option<u32>,
    /// systemd's job result (`done`, `failed`, `timeout`, …), or `error`.
    pub job_result: String,
    pub error: Option<String>,
    pub duration_ms: f64,
    pub new_pid: Option<u32>,
    /// Where containerd's goroutine dump went, for a hang.
    pub stack_dump: Option<String>,
    /// The stop hung and the old main process was killed.
    pub killed_main: bool,
    /// Why the stop was cut short and how (the evidence that it made no progress, or
    /// kill-grace running out).
    pub escalation: Option<String>,
}

/// Maps the agent's monotonic instants onto wall-clock time for display.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    instant: Instant,
    wall: SystemTime,
}

impl WallClock {
    pub fn new() -> Self {
        Self {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn format(&self, at: Instant) -> String {
        let wall = if at >= self.instant {
            self.wall + (at - self.instant)
        } else {
            self.wall - (self.instant - at)
        };
        humantime::format_rfc3339_micros(wall).to_string()
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl VerdictRecord {
    pub fn from_verdict(v: &detector::Verdict, clock: &WallClock) -> Self {
        Self {
            at: clock.format(v.at),
            state: v.state,
            pid: v.pid,
            detection_latency_ms: millis(v.detection_latency()),
            evidence: v
                .evidence
                .iter()
                .map(|e| EvidenceRecord {
                    source: e.source,
                    at: clock.format(e.at),
                    detail: e.detail.clone(),
                })
                .collect(),
            layer: v.layer,
            repeat: v.repeat,
            silent_tasks: v.silent_tasks.clone(),
        }
    }
}

/// Appends an action, folding it into the last one when it repeats it.
pub fn push_action(actions: &mut VecDeque<ActionRecord>, action: ActionRecord) {
    if let Some(last) = actions.back_mut()
        && last.action == action.action
        && last.reason == action.reason
        && last.result == action.result
    {
        last.count += 1;
        last.at = action.at;
        return;
    }
    push_bounded(actions, action);
}

/// Appends to a bounded history, dropping the oldest entry when full.
pub fn push_bounded<T>(history: &mut VecDeque<T>, item: T) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(item);
}
