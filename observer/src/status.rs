//! The status document and the local HTTP endpoint that serves it.
//!
//! The agent owns the document and updates it through a `watch` channel; the HTTP handler
//! only reads. Times are wall-clock RFC 3339 strings; durations are milliseconds.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use axum::{Json, Router, extract::State as AxumState, routing::get};
use serde::Serialize;
use tokio::sync::watch;

use crate::detector::{self, Source, State};

/// How many verdicts and restarts the document keeps.
pub const HISTORY: usize = 100;

/// The JSON document served at `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusDocument {
    /// The detector's judgement of containerd right now.
    pub state: State,
    pub unit: String,
    pub containerd_pid: Option<u32>,
    pub containerd_version: Option<String>,
    /// `fused` (kernel sensors and probes) or `polling_only`.
    pub mode: &'static str,
    pub dry_run: bool,
    pub sensors: Sensors,
    pub last_probe: Option<ProbeRecord>,
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
    pub unit_state: crate::systemd::UnitStatus,
    /// Whether the actuator may restart now, is backing off, or gave up.
    pub restart_budget: BudgetRecord,
    /// The pause switch: while set, the agent judges and records but never acts.
    pub paused: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionRecord {
    pub at: String,
    /// `restart`, `leave_to_systemd`, `leave_stopped`, `refused_by_systemd`, `back_off`,
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
    pub allowance: crate::budget::Allowance,
    pub recent_restarts: usize,
    pub max_restarts: usize,
    pub window_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sensors {
    pub process_exit: SensorStatus,
    pub exit_cause: SensorStatus,
    pub accept_queue: SensorStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct SensorStatus {
    /// `on` (eBPF), `fallback` (a mechanism without eBPF stands in) or `off`.
    pub state: &'static str,
    /// The kernel hook (or other mechanism) the sensor uses.
    pub hook: String,
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
    pub cause: Option<crate::cause::ExitCause>,
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
    /// The stop hung past the grace and systemd killed the main process.
    pub killed_main: bool,
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

/// Serves the status endpoint until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: watch::Receiver<StatusDocument>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/status", get(get_status))
        .with_state(status);
    axum::serve(listener, app).await
}

async fn get_status(
    AxumState(status): AxumState<watch::Receiver<StatusDocument>>,
) -> Json<StatusDocument> {
    Json(status.borrow().clone())
}

/// Fetches the status document from a running agent (for `observer status`).
pub async fn fetch(addr: SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let connect =
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr));
    let mut stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(format!(
                "no observer answers at {addr} ({e}); is it running? (pass --status-listen if it listens elsewhere)"
            ));
        }
        Err(_) => return Err(format!("the observer at {addr} did not accept within 3 s")),
    };
    let request = format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| format!("the observer at {addr} did not answer within 5 s"))?
        .map_err(|e| format!("reading from the observer at {addr} failed: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the answer from {addr} is not HTTP"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let line = head.lines().next().unwrap_or_default();
        return Err(format!("the observer at {addr} answered {line}"));
    }
    Ok(body.to_owned())
}
