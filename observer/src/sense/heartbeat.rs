//! Heartbeat connections: the agent connects to containerd's socket a few times a second
//! and closes at once, without speaking gRPC.
//!
//! A connection that nobody accepts stays in the listener's queue, so a frozen accept loop
//! shows up as an ageing pending connection within one heartbeat even when no other client
//! connects. gRPC servers drop a connection that closes before its preface without logging.
//! The connects also teach the kernel program which socket is containerd's listener.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::sense::kernel::ListenerLearner;

/// Counts of heartbeats sent and failed, for the status document.
#[derive(Debug, Default)]
pub struct HeartbeatCounts {
    pub sent: AtomicU64,
    /// Refused, socket missing, or the listener's backlog full.
    pub failed: AtomicU64,
}

/// The heartbeat thread; stops when dropped.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    pub counts: Arc<HeartbeatCounts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    /// Connects to each of `sockets` every `interval`. With a `learner`, each connect tells
    /// the kernel which listener (by index in `sockets`) it is aimed at.
    pub fn spawn(
        sockets: Vec<PathBuf>,
        interval: Duration,
        learner: Option<ListenerLearner>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(HeartbeatCounts::default());
        let thread = {
            let stop = stop.clone();
            let counts = counts.clone();
            std::thread::Builder::new()
                .name("heartbeat".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for (index, path) in sockets.iter().enumerate() {
                            let attempt = || connect_and_close(path);
                            let result = match &learner {
                                Some(l) => l.while_connecting(index as u32, attempt),
                                None => attempt(),
                            };
                            let counter = if result.is_ok() {
                                &counts.sent
                            } else {
                                &counts.failed
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        std::thread::sleep(interval);
                    }
                })?
        };
        Ok(Self {
            stop,
            counts,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A non-blocking connect: a full backlog fails at once (EAGAIN) instead of blocking.
fn connect_and_close(path: &std::path::Path) -> std::io::Result<()> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    // socket2 sets SOCK_CLOEXEC itself; the socket closes when dropped.
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
    socket.connect(&addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_queue_connections_without_being_accepted() {
        let dir = std::env::temp_dir().join(format!("observer-heartbeat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        connect_and_close(&path).unwrap();
        connect_and_close(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_ok());
        assert!(listener.accept().is_ok());
        drop(listener);
        assert!(connect_and_close(&path).is_err(), "nobody listens any more");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_socket_fails_without_panicking() {
        assert!(connect_and_close(std::path::Path::new("/nonexistent/observer.sock")).is_err());
    }
}
