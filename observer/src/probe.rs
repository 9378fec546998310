//! The `Version()` probe: asks containerd, over its gRPC socket, which version it runs.
//!
//! Each probe opens a fresh connection, so a containerd that no longer accepts connections
//! fails the probe just like one whose handlers hang. Each has its own deadline over the
//! whole exchange: a frozen containerd accepts connections and never answers.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use containerd_client::services::v1::version_client::VersionClient;

use crate::detector::ProbeFailure;

/// What one probe found.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub started: Instant,
    pub started_wall: std::time::SystemTime,
    pub latency: Duration,
    pub outcome: Result<String, (ProbeFailure, String)>,
}

/// Probes containerd's `Version()` on `socket` with a deadline of `timeout`.
pub async fn probe_version(socket: &Path, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let outcome = match tokio::time::timeout(timeout, call_version(socket.to_path_buf())).await {
        Ok(result) => result,
        Err(_) => Err((
            ProbeFailure::Timeout,
            format!("no answer within {}", humantime::format_duration(timeout)),
        )),
    };
    ProbeResult {
        started,
        started_wall,
        latency: started.elapsed(),
        outcome,
    }
}

async fn call_version(socket: PathBuf) -> Result<String, (ProbeFailure, String)> {
    let channel = containerd_client::connect(&socket).await.map_err(|e| {
        let refused = io_error_in(&e).is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            )
        }) || !socket.exists();
        let kind = if refused {
            ProbeFailure::Refused
        } else {
            ProbeFailure::Error
        };
        (
            kind,
            format!("cannot connect to {}: {}", socket.display(), chain(&e)),
        )
    })?;
    let reply = VersionClient::new(channel)
        .version(())
        .await
        .map_err(|status| (ProbeFailure::Error, format!("Version() returned {status}")))?;
    Ok(reply.into_inner().version)
}

/// The first I/O error in an error's chain of sources.
fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = err.source();
    }
    None
}

/// Renders an error with its sources, since tonic's top-level messages say little.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_nobody_listens_on_is_refused() {
        let dir = std::env::temp_dir().join(format!("observer-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dead.sock");
        let _ = std::fs::remove_file(&path);
        // The file stays after the listener closes, as after a SIGKILL of containerd.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let result = probe_version(&path, Duration::from_secs(1)).await;
        assert!(
            matches!(result.outcome, Err((ProbeFailure::Refused, _))),
            "{:?}",
            result.outcome
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = probe_version(&dir.join("missing.sock"), Duration::from_secs(1)).await;
        assert!(matches!(missing.outcome, Err((ProbeFailure::Refused, _))));
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_times_out() {
        let dir = std::env::temp_dir().join(format!("observer-probe-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("frozen.sock");
        let _ = std::fs::remove_file(&path);
        // Bound and listening, never accepting: like a frozen containerd.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let result = probe_version(&path, Duration::from_millis(200)).await;
        assert!(
            matches!(result.outcome, Err((ProbeFailure::Timeout, _))),
            "{:?}",
            result.outcome
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
