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
        let refused = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                )
            })
            .unwrap_or(false)
            || !socket.exists();
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
