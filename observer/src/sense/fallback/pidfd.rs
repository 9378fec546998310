//! Process exit without eBPF: a pidfd (pidfd_open(2), Linux 5.3+) turns readable once its
//! process has exited, which Tokio's reactor reports like any other readiness.
//!
//! The fallback for the eBPF exit sensor when eBPF is unavailable (not root, no BTF,
//! `--no-ebpf`). It needs no privilege and works for any process, child or not.

use std::{io, os::fd::OwnedFd};

use rustix::{
    event::{PollFd, PollFlags, Timespec, poll},
    io::Errno,
    process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal},
};
use tokio::io::{Interest, unix::AsyncFd};

/// Why [`PidExitWatch::open`] could not watch a process.
#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    #[error("{pid} is not a process id: pass a pid between 1 and {}", i32::MAX)]
    InvalidPid { pid: u32 },
    #[error(
        "pid {pid} is a thread, not a process: watch its process instead (the Tgid line of \
         /proc/{pid}/status)"
    )]
    NotProcess { pid: u32 },
    #[error(
        "not permitted to open a pidfd for pid {pid}: {source}; pidfd_open(2) checks no \
         permission itself, so a seccomp filter or security module blocks it: allow pidfd_open \
         or run the observer with eBPF"
    )]
    PermissionDenied {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "this kernel has no pidfd_open(2), which needs Linux 5.3 or newer: upgrade the kernel \
         or run the observer with eBPF"
    )]
    Unsupported,
    #[error(
        "no Tokio runtime is running: open the watch from inside a Tokio runtime with IO enabled"
    )]
    NoRuntime,
    #[error("cannot open a pidfd for pid {pid}: {source}{}", open_hint(.source))]
    Open {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot register the pidfd for pid {pid} with the Tokio reactor: {source}; check that \
         the runtime has IO enabled and the open-file limit is not exhausted"
    )]
    Register {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

fn open_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "; raise the open-file limit (ulimit -n)",
        _ => "",
    }
}

/// Waits for the process `pid` to exit using pidfd_open(2) + poll readiness (tokio AsyncFd).
///
/// Opening by pid races with pid reuse: a pid read before its process exited may name a new
/// process by the time it is opened. Check the process's identity (e.g. its start time in
/// `/proc/<pid>/stat`) after [`open`](Self::open) succeeds; from then on the pidfd names that
/// one process for good.
#[derive(Debug)]
pub struct PidExitWatch {
    pid: u32,
    /// `None` when the process was already gone at open.
    fd: Option<AsyncFd<OwnedFd>>,
}

impl PidExitWatch {
    /// Opens a pidfd for `pid` and registers it with the current Tokio runtime, which must have
    /// IO enabled. A process that no longer exists (`ESRCH`) is not an error: the watch reports
    /// [`already_gone`](Self::already_gone) and [`exited`](Self::exited) returns at once.
    pub fn open(pid: u32) -> Result<Self, PidfdError> {
        let Some(raw_pid) = libc::pid_t::try_from(pid).ok().and_then(Pid::from_raw) else {
            return Err(PidfdError::InvalidPid { pid });
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(PidfdError::NoRuntime);
        }
        let owned = match pidfd_open(raw_pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(errno) => {
                let err = io::Error::from(errno);
                return match errno {
                    Errno::SRCH => Ok(Self { pid, fd: None }),
                    Errno::PERM | Errno::ACCESS => {
                        Err(PidfdError::PermissionDenied { pid, source: err })
                    }
                    Errno::NOSYS => Err(PidfdError::Unsupported),
                    // Without PIDFD_THREAD, a pid that is not a thread-group leader: EINVAL on
                    // older kernels, ENOENT on newer ones (6.18 here).
                    Errno::INVAL | Errno::NOENT => Err(PidfdError::NotProcess { pid }),
                    _ => Err(PidfdError::Open { pid, source: err }),
                };
            }
        };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until the AsyncFd is
        // dropped; nothing else can close it meanwhile, and OwnedFd::as_raw_fd always returns
        // this same descriptor. On failure the error hands it back and it is closed.
        let fd =
            unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }.map_err(|e| {
                PidfdError::Register {
                    pid,
                    source: e.into_parts().1,
                }
            })?;
        Ok(Self { pid, fd: Some(fd) })
    }

    /// The pid being watched.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process had already exited (and been reaped) when the watch was opened.
    pub fn already_gone(&self) -> bool {
        self.fd.is_none()
    }

    /// Whether the process has exited by now (it may still be a zombie), without waiting.
    pub fn has_exited(&self) -> bool {
        self.fd
            .as_ref()
            .is_none_or(|fd| poll_exited(fd.get_ref()).unwrap_or(true))
    }

    /// Sends `signal` to this very process through its pidfd (pidfd_send_signal(2)), never
    /// to another that took its PID. `Ok(false)` when it has already exited.
    pub fn send_signal(&self, signal: Signal) -> io::Result<bool> {
        let Some(fd) = &self.fd else {
            return Ok(false);
        };
        match pidfd_send_signal(fd.get_ref(), signal) {
            Ok(()) => Ok(true),
            Err(Errno::SRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Returns once the process has exited (at once if it already had). Exiting means becoming
    /// a zombie: a child need not be reaped first. Cancel-safe, and it keeps returning at once
    /// after the first time.
    pub async fn exited(&mut self) -> io::Result<()> {
        let Some(fd) = &self.fd else {
            return Ok(());
        };
        loop {
            let mut guard = fd.readable().await?;
            // Readiness may be spurious; the pidfd itself says whether the process has exited.
            if poll_exited(fd.get_ref())? {
                // Exit is permanent, so the readiness is kept for later calls.
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

/// A non-blocking poll(2) of the pidfd: `POLLIN` once the process has exited, `POLLHUP` too once
/// it has been reaped.
fn poll_exited(fd: &OwnedFd) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match poll(&mut fds, Some(&zero)) {
            Ok(_) => break,
            Err(Errno::INTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
    let revents = fds[0].revents();
    if revents.contains(PollFlags::NVAL) {
        return Err(io::Error::other(
            "the pidfd is no longer a valid descriptor",
        ));
    }
    Ok(revents.intersects(PollFlags::IN | PollFlags::HUP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{process::Command, time::Duration};

    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn sees_a_child_exit() {
        let mut child = Command::new("sleep")
            .arg("0.2")
            .spawn()
            .expect("spawn sleep");
        let mut watch = PidExitWatch::open(child.id()).expect("open");
        assert!(!watch.already_gone());
        assert_eq!(watch.pid(), child.id());
        tokio::time::timeout(BOUND, watch.exited())
            .await
            .expect("exit seen within the bound")
            .expect("exited");
        // Exit is seen before reaping: the child is a zombie until waited for.
        assert!(child.try_wait().expect("try_wait").is_some());
        // Later calls return at once.
        tokio::time::timeout(BOUND, watch.exited())
            .await
            .expect("second call")
            .expect("exited");
    }

    #[tokio::test]
    async fn does_not_fire_while_the_process_runs() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let mut watch = PidExitWatch::open(child.id()).expect("open");
        let early = tokio::time::timeout(Duration::from_millis(200), watch.exited()).await;
        assert!(early.is_err(), "exited() returned while the process runs");
        child.kill().expect("kill");
        tokio::time::timeout(BOUND, watch.exited())
            .await
            .expect("exit seen within the bound")
            .expect("exited");
        child.wait().expect("reap");
    }

    #[tokio::test]
    async fn signals_reach_the_process_and_not_after_it_is_gone() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let mut watch = PidExitWatch::open(child.id()).expect("open");
        assert!(!watch.has_exited());
        assert!(watch.send_signal(Signal::KILL).expect("signal"));
        tokio::time::timeout(BOUND, watch.exited())
            .await
            .expect("exit seen within the bound")
            .expect("exited");
        assert!(watch.has_exited());
        child.wait().expect("reap");
        // Reaped: its PID may be anyone's now, and the pidfd still names the dead process.
        assert!(!watch.send_signal(Signal::KILL).expect("no error"));
    }

    #[tokio::test]
    async fn a_reaped_pid_is_already_gone() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("reap");
        let mut watch = PidExitWatch::open(pid).expect("open");
        assert!(watch.already_gone());
        tokio::time::timeout(Duration::from_secs(1), watch.exited())
            .await
            .expect("returns at once")
            .expect("exited");
    }

    #[tokio::test]
    async fn rejects_bad_pids_and_threads() {
        for pid in [0, u32::MAX, i32::MAX as u32 + 1] {
            assert!(matches!(
                PidExitWatch::open(pid),
                Err(PidfdError::InvalidPid { .. })
            ));
        }
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tid_tx.send(tid as u32).expect("send tid");
            let _ = stop_rx.recv();
        });
        let tid = tid_rx.recv().expect("tid");
        let err = PidExitWatch::open(tid).expect_err("a thread id is refused");
        assert!(matches!(err, PidfdError::NotProcess { .. }), "{err}");
        drop(stop_tx);
        thread.join().expect("join");
    }

    #[test]
    fn needs_a_runtime() {
        let err = PidExitWatch::open(std::process::id()).expect_err("no runtime");
        assert!(matches!(err, PidfdError::NoRuntime), "{err}");
        assert!(err.to_string().contains("Tokio runtime"));
    }
}
