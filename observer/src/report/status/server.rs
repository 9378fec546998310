//! The local HTTP endpoint: `/status`, `/livez`, `/readyz` and `/metrics`, on TCP and
//! optionally on a unix socket. Every route is a read-only `GET`.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State as AxumState,
    http::{StatusCode, header},
    response::{IntoResponse as _, Response},
    routing::get,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{StatusDocument, millis};
use crate::{
    daemon::health::Health,
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
    /// `stop` is cancelled; then finishes the answers under way and returns.
    pub async fn serve(
        self,
        tcp: tokio::net::TcpListener,
        unix: Option<tokio::net::UnixListener>,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let app = self.router();
        let tcp =
            axum::serve(tcp, app.clone()).with_graceful_shutdown(stop.clone().cancelled_owned());
        match unix {
            None => tcp.await,
            Some(unix) => {
                let unix = axum::serve(unix, app).with_graceful_shutdown(stop.cancelled_owned());
                let (tcp, unix) = tokio::join!(tcp.into_future(), unix.into_future());
                tcp.and(unix)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
