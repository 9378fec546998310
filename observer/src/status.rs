//! The status document, the local HTTP endpoint that serves it (with `/livez`, `/readyz`
//! and `/metrics`), and the client side of `observer status`.
//!
//! The agent owns the document and updates it through a `watch` channel; the HTTP handlers
//! only read. Times are wall-clock RFC 3339 strings; durations are milliseconds.

use std::{
    collections::VecDeque,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json, Router,
    extract::State as AxumState,
    http::{StatusCode, header},
    response::{IntoResponse as _, Response},
    routing::get,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    config::StatusTarget,
    detector::{self, Source, State},
    health::Health,
    metrics::{self, Metrics},
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
pub struct ObserverRecord {
    pub version: &'static str,
    pub pid: u32,
    pub started_at: String,
}

impl ObserverRecord {
    /// This process, starting now.
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }
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

/// What the HTTP routes read: the status document, the agent's own health and its metrics.
/// Every route is a read-only `GET`; nothing served here changes the agent's state.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub status: watch::Receiver<StatusDocument>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Asks the agent's loop to read the programs' statistics into the document; the loop
    /// answers once it has. They are read only when someone asks: each read is a syscall per
    /// program, and nobody needs them every second.
    pub refresh: mpsc::Sender<RefreshRequest>,
}

/// A request for fresh program statistics, answered when the document has them.
pub type RefreshRequest = oneshot::Sender<()>;

/// How long `/status` waits for fresh program statistics before it serves the document as
/// it is (a stuck agent loop must not make `/status` hang: `/livez` reports that).
const REFRESH_WAIT: Duration = Duration::from_millis(250);

impl Endpoint {
    fn router(self) -> Router {
        Router::new()
            .route("/status", get(get_status))
            .route("/livez", get(get_livez))
            .route("/readyz", get(get_readyz))
            .route("/metrics", get(get_metrics))
            .with_state(self)
    }

    /// Serves the routes on `tcp` and, when given, on `unix`, until either listener fails.
    pub async fn serve(
        self,
        tcp: tokio::net::TcpListener,
        unix: Option<tokio::net::UnixListener>,
    ) -> std::io::Result<()> {
        let app = self.router();
        match unix {
            None => axum::serve(tcp, app).await,
            Some(unix) => {
                tokio::select! {
                    r = axum::serve(tcp, app.clone()).into_future() => r,
                    r = axum::serve(unix, app).into_future() => r,
                }
            }
        }
    }
}

/// Binds the unix socket of the endpoint. A socket file left by an earlier run is replaced;
/// a live one (another agent answers on it) or a file that is not a socket is an error.
pub fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process answers on it; stop it or choose another --status-socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists and is not a socket; remove it or choose another --status-socket",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
        }
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

async fn get_status(AxumState(endpoint): AxumState<Endpoint>) -> Json<StatusDocument> {
    let (done, answered) = oneshot::channel();
    if endpoint.refresh.try_send(done).is_ok() {
        let _ = tokio::time::timeout(REFRESH_WAIT, answered).await;
    }
    Json(endpoint.status.borrow().clone())
}

/// 200 while the agent's main loop turns; 503 once it has stood still too long.
async fn get_livez(AxumState(endpoint): AxumState<Endpoint>) -> Response {
    let now = Instant::now();
    let since = endpoint.health.since_last_beat(now).map(millis);
    let live = endpoint.health.is_live(now);
    let code = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "live": live, "last_loop_turn_ms_ago": since });
    (code, Json(body)).into_response()
}

/// 200 once the sensors have started and the first probe finished; 503 with what is
/// missing before.
async fn get_readyz(AxumState(endpoint): AxumState<Endpoint>) -> Response {
    match endpoint.health.readiness() {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({ "ready": true }))).into_response(),
        Err(not_ready) => (StatusCode::SERVICE_UNAVAILABLE, Json(not_ready)).into_response(),
    }
}

async fn get_metrics(AxumState(endpoint): AxumState<Endpoint>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        endpoint.metrics.encode(),
    )
        .into_response()
}

/// Why `observer status` could not get the document.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "the observer is not running: nothing listens at {target} ({detail}); start it, or point --status-listen or --status-socket at where it listens"
    )]
    NotRunning {
        target: StatusTarget,
        detail: String,
    },
    #[error(
        "the observer at {target} did not answer within {} s: it may be stuck or overloaded; check its log and `curl {target}/livez`",
        .waited.as_secs_f64()
    )]
    Timeout {
        target: StatusTarget,
        waited: Duration,
    },
    #[error(
        "something answers at {target}, but not with HTTP: is that the observer's address? ({detail})"
    )]
    NotHttp {
        target: StatusTarget,
        detail: String,
    },
    #[error("the observer at {target} answered `{status_line}` instead of the status document")]
    Status {
        target: StatusTarget,
        status_line: String,
    },
    #[error("cannot reach the observer at {target}: {source}")]
    Io {
        target: StatusTarget,
        source: std::io::Error,
    },
}

impl FetchError {
    /// `observer status` exits with 3 when the agent is not running (like `systemctl status`
    /// for an inactive unit) and with 1 when it runs but cannot be read.
    pub fn exit_code(&self) -> u8 {
        match self {
            FetchError::NotRunning { .. } => 3,
            _ => 1,
        }
    }
}

/// How long `observer status` waits to connect and then for the whole answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches the status document from a running agent (for `observer status`).
pub async fn fetch(target: &StatusTarget) -> Result<String, FetchError> {
    fetch_with(target, CONNECT_TIMEOUT, ANSWER_TIMEOUT).await
}

async fn fetch_with(
    target: &StatusTarget,
    connect_within: Duration,
    answer_within: Duration,
) -> Result<String, FetchError> {
    let connect_error = |source: std::io::Error| {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        if matches!(source.kind(), ConnectionRefused | NotFound) {
            FetchError::NotRunning {
                target: target.clone(),
                detail: source.to_string(),
            }
        } else {
            FetchError::Io {
                target: target.clone(),
                source,
            }
        }
    };
    let timeout = |waited| FetchError::Timeout {
        target: target.clone(),
        waited,
    };
    let response = match target {
        StatusTarget::Tcp(addr) => {
            let stream = tokio::time::timeout(connect_within, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| timeout(connect_within))?
                .map_err(connect_error)?;
            tokio::time::timeout(answer_within, get_over(stream, &addr.to_string()))
                .await
                .map_err(|_| timeout(answer_within))?
        }
        StatusTarget::Unix(path) => {
            let stream =
                tokio::time::timeout(connect_within, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| timeout(connect_within))?
                    .map_err(connect_error)?;
            tokio::time::timeout(answer_within, get_over(stream, "localhost"))
                .await
                .map_err(|_| timeout(answer_within))?
        }
    }
    .map_err(|source| FetchError::Io {
        target: target.clone(),
        source,
    })?;
    let not_http = |detail: &str| FetchError::NotHttp {
        target: target.clone(),
        detail: detail.to_owned(),
    };
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| not_http("no HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") {
        return Err(not_http(&format!(
            "it began with {:?}",
            status_line.chars().take(40).collect::<String>()
        )));
    }
    if status_line.split(' ').nth(1) != Some("200") {
        return Err(FetchError::Status {
            target: target.clone(),
            status_line: status_line.to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&response[split + 4..]).into_owned())
}

/// One `GET /status` over HTTP/1.0, which makes the server close the connection after a
/// plain (not chunked) body.
async fn get_over(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    host: &str,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let request =
        format!("GET /status HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(response)
}

/// The short summary `observer status` prints for people. `colour` adds ANSI colours;
/// `now` dates the document's times ("3 s ago").
pub fn summary(doc: &serde_json::Value, colour: bool, now: SystemTime) -> String {
    use serde_json::Value;
    use std::fmt::Write as _;
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let ago = |v: &Value| {
        v.as_str()
            .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
            .and_then(|at| now.duration_since(at).ok())
            .map(|d| {
                format!(
                    "{} ago",
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                )
            })
            .unwrap_or_else(|| text(v))
    };
    let state_colour = |state: &str| match state {
        "healthy" | "on" | "done" | "ok" | "restart" => "32",
        "starting" | "suspect" | "recovering" | "fallback" | "dry_run" | "paused" => "33",
        "off" => "2",
        _ => "31",
    };
    let mut out = String::new();
    let state = text(&doc["state"]);
    let _ = writeln!(
        out,
        "containerd  {}  {} pid {} version {}",
        paint(&format!("1;{}", state_colour(&state)), &state),
        text(&doc["unit"]),
        text(&doc["containerd_pid"]),
        text(&doc["containerd_version"]),
    );
    let mut mode = text(&doc["mode"]);
    if doc["dry_run"] == true {
        mode.push_str(", dry run");
    }
    if doc["paused"] == true {
        mode.push_str(", paused");
    }
    let _ = writeln!(
        out,
        "observer    pid {} version {}, {mode}",
        text(&doc["observer"]["pid"]),
        text(&doc["observer"]["version"]),
    );
    let probe = &doc["last_probe"];
    if probe.is_object() {
        let result = text(&probe["result"]);
        let _ = writeln!(
            out,
            "last probe  {} in {} ms, {}{}",
            paint(state_colour(&result), &result),
            text(&probe["latency_ms"]),
            ago(&probe["at"]),
            probe["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(out, "last probe  none yet");
    }
    if let Some(sensors) = doc["sensors"].as_object() {
        for (i, (name, sensor)) in sensors.iter().enumerate() {
            let state = text(&sensor["state"]);
            let _ = writeln!(
                out,
                "{}{name:<13} {} via {}{}",
                if i == 0 {
                    "sensors     "
                } else {
                    "            "
                },
                paint(state_colour(&state), &format!("{state:<8}")),
                text(&sensor["hook"]),
                sensor["reason"]
                    .as_str()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    match doc["verdicts"].as_array().and_then(|v| v.last()) {
        Some(v) => {
            let state = text(&v["state"]);
            let _ = writeln!(
                out,
                "verdict     {} {}, pid {}, detected in {} ms{}",
                paint(state_colour(&state), &state),
                ago(&v["at"]),
                text(&v["pid"]),
                text(&v["detection_latency_ms"]),
                v["evidence"][0]["detail"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "verdict     none yet");
        }
    }
    match doc["actions"].as_array().and_then(|a| a.last()) {
        Some(a) => {
            let action = text(&a["action"]);
            let count = a["count"].as_u64().filter(|&c| c > 1);
            let _ = writeln!(
                out,
                "action      {} for {} {}: {}{}",
                paint(state_colour(&action), &action),
                text(&a["reason"]),
                ago(&a["at"]),
                text(&a["result"]),
                count.map(|c| format!(" ({c} times)")).unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(out, "action      none yet");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one connection with `answer` (or never answers when `None`), after reading
    /// the request.
    async fn one_shot(answer: Option<&'static [u8]>) -> StatusTarget {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            match answer {
                Some(a) => {
                    let _ = stream.write_all(a).await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
        });
        StatusTarget::Tcp(addr)
    }

    fn fetch_quickly(target: &StatusTarget) -> Result<String, FetchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fetch_with(
            target,
            Duration::from_millis(500),
            Duration::from_millis(300),
        ))
    }

    fn with_server(answer: Option<&'static [u8]>) -> Result<String, FetchError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let target = rt.block_on(one_shot(answer));
        let result = rt.block_on(fetch_with(
            &target,
            Duration::from_millis(500),
            Duration::from_millis(300),
        ));
        rt.shutdown_background();
        result
    }

    #[test]
    fn fetch_tells_not_running_from_timeout_from_not_http() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = fetch_quickly(&StatusTarget::Tcp(closed)).unwrap_err();
        assert!(matches!(err, FetchError::NotRunning { .. }), "{err}");
        assert_eq!(err.exit_code(), 3);
        assert!(err.to_string().contains("not running"), "{err}");

        let err =
            fetch_quickly(&StatusTarget::Unix("/nonexistent/observer.sock".into())).unwrap_err();
        assert!(matches!(err, FetchError::NotRunning { .. }), "{err}");

        let err = with_server(None).unwrap_err();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("did not answer within"), "{err}");
        assert_eq!(err.exit_code(), 1);

        let err = with_server(Some(b"SSH-2.0-OpenSSH_9.2\r\n")).unwrap_err();
        assert!(matches!(err, FetchError::NotHttp { .. }), "{err}");
        let err = with_server(Some(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")).unwrap_err();
        assert!(matches!(err, FetchError::NotHttp { .. }), "{err}");

        let err = with_server(Some(b"HTTP/1.0 404 Not Found\r\n\r\nnope")).unwrap_err();
        assert!(err.to_string().contains("404 Not Found"), "{err}");

        let body = with_server(Some(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}")).unwrap();
        assert_eq!(body, "{}");
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_a_live_one_kept() {
        let dir = std::env::temp_dir().join(format!("observer-status-sock-{}", std::process::id()));
        let path = dir.join("sub/status.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = bind_unix(&path).unwrap();
            let err = bind_unix(&path).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
            drop(first);
            // The file stays behind, as after a crash; the next bind replaces it.
            assert!(path.exists());
            bind_unix(&path).unwrap();
        });
        let file = dir.join("plain");
        std::fs::write(&file, "").unwrap();
        let err = rt
            .block_on(async { bind_unix(&file).map(drop) })
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn document() -> serde_json::Value {
        serde_json::json!({
            "state": "crashed",
            "unit": "containerd.service",
            "containerd_pid": 41,
            "containerd_version": "1.6.20",
            "mode": "fused",
            "dry_run": false,
            "paused": true,
            "observer": { "version": "0.1.0", "pid": 7 },
            "sensors": {
                "process_exit": { "state": "on", "hook": "sched_process_exit", "reason": null },
                "accept_queue": { "state": "fallback", "hook": "sock_diag", "reason": "no BTF" }
            },
            "last_probe": { "at": "2030-01-01T00:00:00Z", "result": "refused", "latency_ms": 0.2, "error": "cannot connect" },
            "verdicts": [{ "at": "2030-01-01T00:00:00Z", "state": "crashed", "pid": 41,
                           "detection_latency_ms": 0.1, "evidence": [{ "detail": "killed by SIGKILL" }] }],
            "actions": [{ "at": "2030-01-01T00:00:01Z", "action": "restart", "reason": "crashed",
                          "result": "done: new pid 42", "count": 1 }]
        })
    }

    #[test]
    fn summary_names_state_pid_probe_sensors_verdict_and_action() {
        let now = humantime::parse_rfc3339("2030-01-01T00:00:05Z").unwrap();
        let text = summary(&document(), false, now);
        for wanted in [
            "containerd  crashed  containerd.service pid 41 version 1.6.20",
            "observer    pid 7 version 0.1.0, fused, paused",
            "last probe  refused in 0.2 ms, 5s ago: cannot connect",
            "sensors     accept_queue  fallback via sock_diag (no BTF)",
            "            process_exit  on       via sched_process_exit",
            "verdict     crashed 5s ago, pid 41, detected in 0.1 ms: killed by SIGKILL",
            "action      restart for crashed 4s ago: done: new pid 42",
        ] {
            assert!(text.contains(wanted), "{wanted:?} not in\n{text}");
        }
        assert!(!text.contains('\x1b'), "no colour asked for");
        let coloured = summary(&document(), true, now);
        assert!(coloured.contains("\x1b[1;31mcrashed\x1b[0m"), "{coloured}");
        assert!(coloured.contains("\x1b[32mon      \x1b[0m"), "{coloured}");
    }

    #[test]
    fn summary_of_a_starting_agent_says_none_yet() {
        let doc = serde_json::json!({ "state": "starting", "verdicts": [], "actions": [] });
        let text = summary(&doc, false, SystemTime::now());
        assert!(text.contains("last probe  none yet"), "{text}");
        assert!(text.contains("verdict     none yet"), "{text}");
        assert!(text.contains("action      none yet"), "{text}");
    }
}
