//! containerd's `Version()` over its gRPC socket, for threads without a runtime: the
//! benchmarks call it to learn the moment a restarted containerd answers, and the soak calls
//! it steadily as load.
//!
//! It is the agent's own probe ([`observer::sense::probe::probe_version`]: containerd-client
//! over tonic, one connection per call, its own deadline), so the figures measure the client
//! the agent uses. Each calling thread keeps a current-thread runtime of its own.

use std::{cell::RefCell, io, path::Path, time::Duration};

use observer::{judge::detector::ProbeFailure, sense::probe::probe_version};

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Asks containerd at `socket` for its version and returns it, or fails within `timeout`:
/// `ConnectionRefused` when nobody listens, `TimedOut` when nobody answers, `Other` for any
/// other failure (a gRPC error, a broken connection).
pub fn containerd_version(socket: &Path, timeout: Duration) -> io::Result<String> {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let runtime = match &mut *slot {
            Some(runtime) => runtime,
            empty => empty.insert(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            ),
        };
        let result = runtime.block_on(probe_version(socket, timeout));
        result.outcome.map_err(|(failure, detail)| {
            let kind = match failure {
                ProbeFailure::Refused => io::ErrorKind::ConnectionRefused,
                ProbeFailure::Timeout => io::ErrorKind::TimedOut,
                ProbeFailure::Error | ProbeFailure::ObserverSide => io::ErrorKind::Other,
            };
            io::Error::new(kind, detail)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_nobody_listens_on_is_refused() {
        let dir = std::env::temp_dir().join(format!("observer-tests-grpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = containerd_version(&path, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        // The thread's runtime serves the next call too.
        let err = containerd_version(&dir.join("absent.sock"), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
