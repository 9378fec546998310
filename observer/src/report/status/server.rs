//! The local HTTP endpoint: `/status`, `/livez`, `/readyz` and `/metrics`, on TCP and
//! optionally on a unix socket. Every route is a read-only `GET`.
//!
//! Every local process can reach the TCP port, so the endpoint must hold under abuse and
//! must never take what the observer needs for its own work. It serves HTTP/1 from its own
//! accept loop, with:
//! - a cap on open connections, a quarter of the soft descriptor limit and at most
//!   [`MAX_CONNECTIONS`]: the other three quarters stay for the probes, the sensors and
//!   the bus, whatever the traffic. At the cap a new connection pushes out the oldest one
//!   not being answered at that moment (idle, or still sending its headers), so a flood of
//!   idle connections cannot lock out the kubelet's probe, which sends its request at once;
//! - a deadline for each request's headers ([`HEADER_TIMEOUT`], from the moment the
//!   connection waits for them: idle keep-alive connections too) and a lifetime for each
//!   connection ([`CONNECTION_LIFETIME`]);
//! - at most [`MAX_REQUEST_BYTES`] read for a request's head; no route reads a body;
//! - `/livez` and `/readyz` answer from atomics the loop writes, never waiting on it.

use std::{
    collections::BTreeMap,
    future::Future,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State as AxumState,
    http::{StatusCode, header},
    response::{IntoResponse as _, Response},
    routing::get,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{StatusDocument, millis};
use crate::{
    daemon::{health::Health, limits},
    report::metrics::{self, Metrics},
};

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

/// Most connections the endpoint keeps open at once, however high the descriptor limit.
pub const MAX_CONNECTIONS: usize = 256;
/// Fewest, however low the limit: enough for the kubelet and an operator.
const MIN_CONNECTIONS: usize = 8;
/// How long a connection may take to send a request's headers, counted from when it is
/// accepted or its previous answer was sent. The kubelet and `observer status` send theirs
/// at once.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any one connection may stay open, busy or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Most bytes read for one request's line and headers (hyper's smallest buffer is 8 KiB).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 32;
/// Pause after an accept that failed for want of descriptors or memory: the connection
/// stays queued in the kernel meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The connection cap for a soft descriptor limit of `soft`.
pub fn connection_cap(soft: u64) -> usize {
    usize::try_from(soft / 4)
        .unwrap_or(usize::MAX)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

impl Endpoint {
    fn router(self) -> Router {
        Router::new()
            .route("/status", get(get_status))
            .route("/livez", get(get_livez))
            .route("/readyz", get(get_readyz))
            .route("/metrics", get(get_metrics))
            .with_state(self)
    }

    /// Serves the routes on `tcp` and, when given, on `unix`, until either listener fails or
    /// `stop` is cancelled; then finishes the answers under way and returns. Both share one
    /// connection cap, sized from the descriptor limit at this moment.
    pub async fn serve(
        self,
        tcp: tokio::net::TcpListener,
        unix: Option<tokio::net::UnixListener>,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let soft = limits::nofile().map_or(1024, |(soft, _)| soft);
        let connections = Arc::new(Connections::new(connection_cap(soft)));
        let metrics = self.metrics.clone();
        let app = self.router();
        let tcp = accept_loop(
            tcp,
            app.clone(),
            connections.clone(),
            metrics.clone(),
            stop.clone(),
        );
        match unix {
            None => tcp.await,
            Some(unix) => {
                let unix = accept_loop(unix, app, connections, metrics, stop);
                let (tcp, unix) = tokio::join!(tcp, unix);
                tcp.and(unix)
            }
        }
    }
}

/// A listener the endpoint accepts from: TCP or unix.
trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.accept().await?;
        Ok(stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.accept().await?;
        Ok(stream)
    }
}

/// Accepts connections until `stop`, each served in its own task within the shared cap,
/// then waits for those to finish the answers under way. Errors of single connections end
/// only those; an accept that fails for want of descriptors waits a moment and tries again,
/// leaving the connection queued in the kernel.
async fn accept_loop<L: Listener>(
    listener: L,
    app: Router,
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut warned_at: Option<Instant> = None;
    let mut serving = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = serving.join_next(), if !serving.is_empty() => continue,
            accepted = listener.accept_io() => accepted,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) if crate::sense::probe::observer_side(&e).is_some() => {
                metrics.status_accept_error();
                if warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    warn!("the status endpoint cannot accept a connection ({e}); trying again");
                    warned_at = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            // The peer gave up before it was accepted, and the like: that connection only.
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => return Err(e),
        };
        let Some(slot) = connections.admit(&metrics) else {
            // Every slot is answering a request right now: this one waits for no one.
            metrics.status_connection_shed();
            continue;
        };
        serving.spawn(serve_connection(io, app.clone(), slot, stop.clone()));
    }
    while serving.join_next().await.is_some() {}
    Ok(())
}

fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Serves one connection until it closes, breaks a limit, or is shed for a newer one. On
/// `stop` it finishes the answer under way, if any, and closes.
async fn serve_connection<I>(io: I, app: Router, mut slot: Slot, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connections = slot.connections.clone();
    let id = slot.id;
    let service = hyper::service::service_fn(move |request| {
        let answering = connections.answering(id);
        let mut app = app.clone();
        async move {
            let response = tower_service::Service::call(&mut app, request).await;
            drop(answering);
            response
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .max_headers(MAX_HEADERS);
    let connection = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                debug!("status connection closed: {e}");
            }
        }
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(REFRESH_WAIT * 4, connection).await;
        }
        _ = &mut slot.shed => debug!("status connection shed for a newer one at the cap"),
        _ = lifetime => debug!("status connection outlived {CONNECTION_LIFETIME:?}"),
    }
    drop(slot);
}

/// The open connections, oldest first, and whether each is answering a request now.
#[derive(Debug)]
struct Connections {
    cap: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    by_age: BTreeMap<u64, OpenConnection>,
}

#[derive(Debug)]
struct OpenConnection {
    answering: bool,
    shed: Option<oneshot::Sender<()>>,
}

/// A connection's place under the cap; dropping it frees the place.
struct Slot {
    id: u64,
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
    shed: oneshot::Receiver<()>,
}

impl Connections {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            open: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection. At the cap, the oldest connection that is not answering
    /// a request is told to close; `None` when every one is answering.
    fn admit(self: &Arc<Self>, metrics: &Arc<Metrics>) -> Option<Slot> {
        let mut open = self.lock();
        if open.by_age.len() >= self.cap {
            let oldest_idle = open
                .by_age
                .iter()
                .find(|(_, c)| !c.answering)
                .map(|(id, _)| *id)?;
            if let Some(mut shed) = open.by_age.remove(&oldest_idle) {
                metrics.status_connection_shed();
                if let Some(tell) = shed.shed.take() {
                    let _ = tell.send(());
                }
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let (tell, shed) = oneshot::channel();
        open.by_age.insert(
            id,
            OpenConnection {
                answering: false,
                shed: Some(tell),
            },
        );
        metrics.set_status_connections(open.by_age.len());
        Some(Slot {
            id,
            connections: self.clone(),
            metrics: metrics.clone(),
            shed,
        })
    }

    /// Marks connection `id` as answering a request until the guard is dropped.
    fn answering(self: &Arc<Self>, id: u64) -> Answering {
        self.set_answering(id, true);
        Answering {
            id,
            connections: self.clone(),
        }
    }

    fn set_answering(&self, id: u64, answering: bool) {
        if let Some(c) = self.lock().by_age.get_mut(&id) {
            c.answering = answering;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_age.len()
    }
}

/// While alive, its connection is answering a request and is not shed.
struct Answering {
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.connections.set_answering(self.id, false);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        open.by_age.remove(&self.id);
        self.metrics.set_status_connections(open.by_age.len());
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
    let listener = tokio::net::UnixListener::bind(path)?;
    // Owner only, whatever the umask: connecting needs write permission on the socket, and
    // only root (the owner) is to read the status this way.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
    Ok(listener)
}

/// The mode of the status socket: read and written by its owner only.
pub const SOCKET_MODE: u32 = 0o600;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_three_quarters_of_the_descriptors_to_the_observer() {
        assert_eq!(connection_cap(1024), 256);
        assert_eq!(connection_cap(256), 64);
        assert_eq!(connection_cap(16), MIN_CONNECTIONS);
        assert_eq!(connection_cap(1 << 20), MAX_CONNECTIONS);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_and_answering_ones_stay() {
        let metrics = Arc::new(Metrics::new());
        let connections = Arc::new(Connections::new(2));
        let mut first = connections.admit(&metrics).unwrap();
        let mut second = connections.admit(&metrics).unwrap();
        // The first is answering a request: the second, idle, is shed for the third.
        let answering = connections.answering(first.id);
        let mut third = connections.admit(&metrics).unwrap();
        assert_eq!(connections.len(), 2);
        assert!(
            second.shed.try_recv().is_ok(),
            "the idle one was told to close"
        );
        assert!(first.shed.try_recv().is_err(), "the answering one stays");
        drop(second);
        // Both remaining are answering: a newcomer is turned away, nobody is shed.
        let _third_answering = connections.answering(third.id);
        assert!(connections.admit(&metrics).is_none());
        assert!(third.shed.try_recv().is_err());
        drop(answering);
        assert!(connections.admit(&metrics).is_some());
        assert!(
            first.shed.try_recv().is_ok(),
            "idle again, the oldest goes first"
        );
        drop((first, third));
        assert!(
            metrics
                .encode()
                .contains("containerd_observer_status_connections_shed_total 2")
        );
    }

    #[test]
    fn a_stale_socket_file_is_replaced_a_live_one_kept_and_only_the_owner_may_connect() {
        let dir = std::env::temp_dir().join(format!("observer-status-sock-{}", std::process::id()));
        let path = dir.join("sub/status.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = bind_unix(&path).unwrap();
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode, SOCKET_MODE,
                "the socket is its owner's alone: {mode:o}"
            );
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
}
