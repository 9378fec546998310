//! The harness the observer's integration tests and `cargo xtask run` share.
//!
//! - [`Sandbox`]: a private containerd, run as the unit `containerd.service` of a private
//!   systemd user manager that owns `org.freedesktop.systemd1` on a private session bus. It
//!   needs root but not systemd as PID 1, and several sandboxes can run at once.
//! - [`Observer`]: the `observer` binary pointed at a sandbox, with helpers that poll its
//!   HTTP status endpoint.
//! - [`bench`]: the measurements behind `cargo xtask bench` and `cargo xtask soak`.
//! - [`require`]: the gate every privileged test passes first. It skips loudly on a developer
//!   machine that lacks something, and fails in CI, where a skipped privileged test would hide
//!   a regression.
//!
//! ```no_run
//! use std::time::Duration;
//! use observer_tests::{Need, Observer, Sandbox, SandboxOptions, require};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! if require("my_test", &[Need::Root, Need::Systemd, Need::Containerd, Need::Unshare]).is_err() {
//!     return Ok(());
//! }
//! let sandbox = Sandbox::start(SandboxOptions::new().restart("no"))?;
//! let observer = Observer::spawn(&sandbox, &["--no-ebpf"])?;
//! observer.wait_ready(Duration::from_secs(10))?;
//! # Ok(()) }
//! ```
//!
//! Declare the [`Sandbox`] before the [`Observer`]: locals drop in reverse order, so the
//! observer stops before the containerd it watches goes away.

pub mod bench;
mod cgroup;
mod cri;
pub mod fault;
mod gate;
mod grpc;
pub mod image;
mod inject;
mod observer;
mod podman;
mod process;
mod sandbox;
mod snapshotter;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use cri::list_pod_sandbox;
pub use gate::{Need, OBSERVER_NEEDS, Skip, require};
pub use grpc::containerd_version;
pub use inject::{Container, FrozenRoot, K8S_NAMESPACE, StartupHang, StoppedShim};
pub use observer::{Observer, free_local_addr, observer_bin};
pub use podman::Podman;
pub use sandbox::{BusOutage, Sandbox, SandboxOptions};
pub use snapshotter::RemoteSnapshotter;

/// Everything that can go wrong while starting, driving or asking a sandbox or an observer.
/// Each message says what happened and, where the fix is on the caller's side, what to do;
/// `details` carry the tail of the relevant log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// A program the sandbox runs is not installed.
    #[error("{tool} is not installed: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    /// The caller asked for something that cannot work.
    #[error("invalid sandbox option: {0}")]
    InvalidOption(String),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The sandbox could not get its own cgroup, which keeps its units apart from other
    /// sandboxes' (units of the same name would otherwise share one cgroup and kill each other).
    #[error(
        "could not set up the sandbox's cgroup {path}: {source}; the sandbox needs root and a \
         writable cgroup filesystem (a VM, or a container started with --privileged)"
    )]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `systemctl --user ...` exited with an error.
    #[error("`systemctl --user {args}` failed ({status}): {stderr}{hint}")]
    Systemctl {
        args: String,
        status: String,
        stderr: String,
        hint: &'static str,
    },
    /// Something did not happen in time.
    #[error("timed out after {waited:?} waiting for {what}\n{details}")]
    Timeout {
        what: String,
        waited: Duration,
        details: String,
    },
    /// A process of the sandbox or the observer stopped or misbehaved.
    #[error("{what}\n{details}")]
    Failed { what: String, details: String },
    /// The observer binary has not been built.
    #[error(
        "the observer binary {path} does not exist: build it with `cargo build -p observer`, \
         or point OBSERVER_BIN at one"
    )]
    ObserverMissing { path: PathBuf },
    /// A request to the observer's status endpoint failed.
    #[error("GET http://{addr}{path} failed: {detail}")]
    Http {
        addr: SocketAddr,
        path: String,
        detail: String,
    },
}

/// Sends `signal` to a sandbox process (containerd, usually): the fault injection of the tests.
///
/// # Panics
/// When the process does not exist: a test that signals a process it did not find is wrong.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// One `GET http://{addr}{path}` (5 s deadline), as a kubelet's HTTP probe makes it: the
/// status code and body, or `None` when nothing answered.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    observer::http_get(addr, path, Duration::from_secs(5)).ok()
}

/// A process stopped with SIGSTOP until this guard goes: dropping it sends SIGCONT, so a
/// test that fails or panics never leaves a process of its own stopped.
#[derive(Debug)]
pub struct Stopped(u32);

impl Stopped {
    /// Stops `pid` (SIGSTOP).
    pub fn stop(pid: u32) -> Stopped {
        signal(pid, libc::SIGSTOP);
        Stopped(pid)
    }

    /// Lets it run again now.
    pub fn resume(self) {}
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the process may be gone.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

impl SandboxError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        SandboxError::Io {
            what: what.into(),
            source,
        }
    }
}
