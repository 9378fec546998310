//! The `Version()` probes: ask containerd, over its gRPC socket, which version it runs.
//!
//! [`probe_version`] opens a fresh connection each time, so a containerd that no longer
//! accepts connections fails it just like one whose handlers hang. [`OpenConnection`] asks
//! over a connection kept open between probes, as the kubelet's is: it needs only the
//! handlers. Side by side they tell "the accept loop is behind" from "the handlers are dead".
//! Each call has its own deadline over the whole exchange: a frozen containerd accepts
//! connections and never answers.
//!
//! A failure is sorted by whose side caused it. Only containerd's side is evidence against
//! containerd: a refused connection or a missing socket, a timeout while the connection is
//! open or queued, an error status or a broken connection. A probe that could not even be
//! sent because the observer itself is out of descriptors or memory, or may not open the
//! socket, is [`ProbeFailure::ObserverSide`]: the observer is degraded, containerd unjudged.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use containerd_client::services::v1::version_client::VersionClient;
use tonic::transport::Channel;

use crate::judge::detector::{ProbeChannel, ProbeFailure};

/// What one probe found.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub started: Instant,
    pub started_wall: std::time::SystemTime,
    pub latency: Duration,
    pub outcome: Result<String, (ProbeFailure, String)>,
    pub channel: ProbeChannel,
}

/// First and longest pause before connecting again to a socket whose accept backlog is full.
const BACKLOG_RETRY_FIRST: Duration = Duration::from_millis(5);
const BACKLOG_RETRY_MAX: Duration = Duration::from_millis(100);

/// Probes containerd's `Version()` on `socket` with a deadline of `timeout`.
pub async fn probe_version(socket: &Path, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let backlog_full = AtomicU32::new(0);
    let call = call_version(socket.to_path_buf(), &backlog_full);
    let outcome = match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => {
            let full = backlog_full.load(Ordering::Relaxed);
            let detail = if full > 0 {
                format!(
                    "no answer within {}: containerd's accept backlog was full ({full} connect attempt(s) refused with EAGAIN)",
                    humantime::format_duration(timeout)
                )
            } else {
                format!("no answer within {}", humantime::format_duration(timeout))
            };
            Err((ProbeFailure::Timeout, detail))
        }
    };
    ProbeResult {
        started,
        started_wall,
        latency: started.elapsed(),
        outcome,
        channel: ProbeChannel::Fresh,
    }
}

/// A connection to containerd kept open between probes. Cloning shares the connection; a
/// call that fails with an error drops it, and the next probe connects again; one that
/// times out keeps it.
#[derive(Debug, Clone, Default)]
pub struct OpenConnection {
    channel: Arc<Mutex<Option<Channel>>>,
}

impl OpenConnection {
    /// Asks `Version()` over the open connection (opening it first if there is none), with
    /// a deadline of `timeout`.
    pub async fn probe_version(&self, socket: &Path, timeout: Duration) -> ProbeResult {
        let started = Instant::now();
        let started_wall = std::time::SystemTime::now();
        let kept = self.lock().clone();
        let call = async {
            let channel = match kept {
                Some(channel) => channel,
                None => containerd_client::connect(socket).await.map_err(|e| {
                    (
                        ProbeFailure::Error,
                        format!("cannot connect to {}: {}", socket.display(), chain(&e)),
                    )
                })?,
            };
            let reply = VersionClient::new(channel.clone())
                .version(())
                .await
                .map_err(|status| (ProbeFailure::Error, format!("Version() returned {status}")))?;
            Ok::<_, (ProbeFailure, String)>((channel, reply.into_inner().version))
        };
        let outcome = match tokio::time::timeout(timeout, call).await {
            Ok(Ok((channel, version))) => {
                *self.lock() = Some(channel);
                Ok(version)
            }
            Ok(Err(e)) => {
                self.forget();
                Err(e)
            }
            // A slow answer does not break the connection: keep it, as the kubelet does.
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
            channel: ProbeChannel::Open,
        }
    }

    /// Drops the connection (containerd was restarted: the next probe connects to the new one).
    pub fn forget(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        // The guarded value is a plain handle: a panic elsewhere leaves it usable.
        self.channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Connects, asks, and returns the version. A connect refused with `EAGAIN` (the listener's
/// accept backlog is full: containerd is behind, which is not an answer either way) is tried
/// again until the caller's deadline, counted in `backlog_full`.
async fn call_version(
    socket: PathBuf,
    backlog_full: &AtomicU32,
) -> Result<String, (ProbeFailure, String)> {
    let mut pause = BACKLOG_RETRY_FIRST;
    let connected = loop {
        match containerd_client::connect(&socket).await {
            Err(e)
                if io_error_in(&e)
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::WouldBlock) =>
            {
                backlog_full.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(BACKLOG_RETRY_MAX);
            }
            other => break other,
        }
    };
    let channel = connected.map_err(|e| {
        if let Some(errno) = io_error_in(&e).and_then(observer_side) {
            return (
                ProbeFailure::ObserverSide,
                format!(
                    "the observer could not connect to {} on its own account ({errno}): {}",
                    socket.display(),
                    chain(&e)
                ),
            );
        }
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
        .map_err(|status| {
            // A lazily opened stream can still fail on the observer's side inside the call.
            match io_error_in(&status).and_then(observer_side) {
                Some(errno) => (
                    ProbeFailure::ObserverSide,
                    format!("Version() could not be sent ({errno}): {}", chain(&status)),
                ),
                None => (ProbeFailure::Error, format!("Version() returned {status}")),
            }
        })?;
    Ok(reply.into_inner().version)
}

/// The name of an error that comes from the observer's own state rather than containerd's:
/// its descriptors or memory ran out, or it may not open the socket. `None` for any other.
pub fn observer_side(io: &std::io::Error) -> Option<&'static str> {
    if io.kind() == std::io::ErrorKind::OutOfMemory {
        return Some("ENOMEM");
    }
    match io.raw_os_error()? {
        libc::EMFILE => Some("EMFILE"),
        libc::ENFILE => Some("ENFILE"),
        libc::ENOMEM => Some("ENOMEM"),
        libc::ENOBUFS => Some("ENOBUFS"),
        libc::EACCES => Some("EACCES"),
        libc::EPERM => Some("EPERM"),
        _ => None,
    }
}

/// The first I/O error in an error's chain of sources.
pub(crate) fn io_error_in<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a std::io::Error> {
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

    /// Sets the soft `RLIMIT_NOFILE` of this test process for as long as it lives, and
    /// restores the old limit on drop.
    struct NofileLimit(libc::rlimit);

    impl NofileLimit {
        fn set_soft(soft: libc::rlim_t) -> Self {
            let mut old = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain getrlimit/setrlimit on valid structs.
            unsafe {
                assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut old), 0);
                let new = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: old.rlim_max,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const new), 0);
            }
            Self(old)
        }
    }

    impl Drop for NofileLimit {
        fn drop(&mut self) {
            // SAFETY: restores the limit read in `set_soft`.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const self.0) };
        }
    }

    /// Runs in a child process of its own (this test binary, asked for this test alone), so
    /// that using up the descriptors starves no other test.
    #[test]
    fn running_out_of_descriptors_is_the_observers_fault_not_containerds() {
        const CHILD: &str = "OBSERVER_TEST_EMFILE_CHILD";
        const NAME: &str = "sense::probe::tests::running_out_of_descriptors_is_the_observers_fault_not_containerds";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the child ran the test: {text}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("observer-probe-e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("healthy.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Use up every descriptor below a low soft limit, as a flood of connections would.
        let limit = NofileLimit::set_soft(64);
        let mut hog = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hog.push(f);
        }
        let result = rt.block_on(probe_version(&path, Duration::from_secs(1)));
        drop(hog);
        drop(limit);
        match &result.outcome {
            Err((ProbeFailure::ObserverSide, detail)) => {
                assert!(detail.contains("EMFILE"), "{detail}");
            }
            other => panic!("expected an observer-side failure, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_observers_own_limits_are_its_side() {
        use std::io::Error;
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            assert!(observer_side(&Error::from_raw_os_error(errno)).is_some());
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ENOENT,
            libc::ECONNRESET,
            libc::EPIPE,
        ] {
            assert_eq!(observer_side(&Error::from_raw_os_error(errno)), None);
        }
    }

    /// A listening socket with a backlog of `backlog`, made with libc (std's is 128).
    fn listener_with_backlog(path: &Path, backlog: i32) -> std::os::unix::net::UnixListener {
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
        // SAFETY: plain socket calls on a descriptor this function owns; the address is a
        // zeroed sockaddr_un with a path shorter than its buffer.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in path.as_os_str().as_bytes().iter().enumerate() {
                addr.sun_path[i] = *b as libc::c_char;
            }
            let len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0);
            assert_eq!(libc::listen(fd, backlog), 0);
            std::os::unix::net::UnixListener::from_raw_fd(fd)
        }
    }

    #[tokio::test]
    async fn a_full_accept_backlog_is_tried_again_until_the_deadline() {
        let dir = std::env::temp_dir().join(format!("observer-probe-b-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("busy.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = listener_with_backlog(&path, 0);
        // Fill the backlog: further non-blocking connects get EAGAIN.
        let mut queued = Vec::new();
        while queued.len() < 8 {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(_) => break,
            }
        }
        let result = probe_version(&path, Duration::from_millis(300)).await;
        match &result.outcome {
            Err((ProbeFailure::Timeout, detail)) => {
                assert!(detail.contains("backlog was full"), "{detail}");
            }
            other => panic!("expected a timeout on a full backlog, got {other:?}"),
        }
        assert!(result.latency >= Duration::from_millis(300));
        std::fs::remove_dir_all(&dir).unwrap();
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
