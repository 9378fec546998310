//! The actuator: carries out the detector's decisions through systemd, and only through it.
//!
//! Before acting it reads the unit as systemd sees it and never fights it: a unit systemd is
//! already restarting is left to systemd, a unit an operator stopped stays stopped. [`plan`]
//! is that rule, free of I/O. A restart of a hung containerd escalates: an optional goroutine
//! dump (`SIGUSR1`), `RestartUnit(replace)`, and, if the stop hangs past a bounded grace, a
//! `SIGKILL` of the main process through systemd rather than waiting out `TimeoutStopSec`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{info, warn};

use crate::{
    act::systemd::{Systemd, SystemdError, UnitStatus},
    judge::detector::State,
};

#[derive(Debug, Clone)]
pub struct ActuatorConfig {
    /// How long a hung stop may take before the main process is killed.
    pub kill_grace: Duration,
    /// How long a whole restart job may take before it is reported as stuck.
    pub job_timeout: Duration,
    /// Ask a hung containerd for its goroutine dump before restarting it.
    pub dump_stacks: bool,
    /// How long to wait for systemd to notice a crash before judging the unit's state.
    pub settle: Duration,
}

impl Default for ActuatorConfig {
    fn default() -> Self {
        Self {
            kill_grace: Duration::from_secs(10),
            job_timeout: Duration::from_secs(120),
            dump_stacks: true,
            settle: Duration::from_secs(2),
        }
    }
}

/// What a restart came to.
#[derive(Debug, Clone, Serialize)]
pub struct RestartOutcome {
    /// systemd's job result: `done`, `failed`, `timeout`, `canceled`, …; `error` when the
    /// request itself failed.
    pub job_result: String,
    pub error: Option<String>,
    #[serde(skip)]
    pub duration: Duration,
    pub new_pid: Option<u32>,
    /// Where the goroutine dump went, or why there is none.
    pub stack_dump: Option<String>,
    /// The stop hung past the grace and the main process was killed.
    pub killed_main: bool,
}

impl RestartOutcome {
    pub fn succeeded(&self) -> bool {
        self.job_result == "done"
    }
}

/// Waits (bounded) for systemd to notice that `dead_pid` is gone, then returns the unit's
/// state. Acting before that would read a unit that still looks active.
pub async fn settled_status(
    systemd: &Systemd,
    dead_pid: Option<u32>,
    settle: Duration,
) -> Result<UnitStatus, SystemdError> {
    let deadline = Instant::now() + settle;
    loop {
        let status = systemd.status().await?;
        // Properties are read one at a time: an active unit without a main process is caught
        // mid-change, so read again.
        let between = status.active_state == "active" && status.main_pid.is_none();
        let noticed = dead_pid.is_none() || (status.main_pid != dead_pid && !between);
        if noticed || Instant::now() >= deadline {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restarts the unit, escalating as the verdict warrants, and waits for systemd's result.
pub async fn restart(
    systemd: &Systemd,
    config: &ActuatorConfig,
    verdict: State,
    main_pid: Option<u32>,
) -> RestartOutcome {
    let started = Instant::now();
    let mut stack_dump = None;
    if config.dump_stacks && verdict == State::Hung {
        stack_dump = Some(request_stack_dump(systemd, main_pid).await);
    }
    let mut killed_main = false;
    let (job_result, error) = match systemd.begin_restart().await {
        Err(e) => ("error".to_owned(), Some(e.to_string())),
        Ok(mut job) => {
            let mut outcome = job.wait(config.kill_grace).await;
            if matches!(outcome, Ok(None)) {
                // The stop is hanging (a process that ignores SIGTERM): kill it rather than
                // wait out TimeoutStopSec. systemd then carries on with the start.
                warn!(job = %job.path(), grace = ?config.kill_grace, "stop still hanging; asking systemd to SIGKILL the main process");
                match systemd.kill_main(libc::SIGKILL).await {
                    Ok(()) => killed_main = true,
                    Err(e) => warn!("KillUnit failed: {e}"),
                }
                outcome = job
                    .wait(config.job_timeout.saturating_sub(config.kill_grace))
                    .await;
            }
            match outcome {
                Ok(Some(result)) => (result, None),
                Ok(None) => (
                    "timeout".to_owned(),
                    Some(format!(
                        "systemd did not finish the restart job within {:?}",
                        config.job_timeout
                    )),
                ),
                Err(e) => ("error".to_owned(), Some(e.to_string())),
            }
        }
    };
    let new_pid = systemd.status().await.ok().and_then(|s| s.main_pid);
    // A frozen containerd handles SIGUSR1 only once systemd's stop wakes it (SIGCONT): the
    // dump may have appeared during the restart.
    if let (Some(note), Some(pid)) = (&mut stack_dump, main_pid)
        && note.starts_with("SIGUSR1 sent; no dump")
    {
        let file = stack_dump_path(pid);
        if file.exists() {
            *note = format!(
                "written to {} and containerd's log while it was being stopped",
                file.display()
            );
        }
    }
    RestartOutcome {
        job_result,
        error,
        duration: started.elapsed(),
        new_pid,
        stack_dump,
        killed_main,
    }
}

/// Asks containerd for its goroutine dump and says where it went. containerd 1.6 writes it
/// to its log and to `<tmp>/containerd.<pid>.stacks.log`; a frozen process cannot answer.
async fn request_stack_dump(systemd: &Systemd, pid: Option<u32>) -> String {
    if let Err(e) = systemd.kill_main(libc::SIGUSR1).await {
        return format!("could not send SIGUSR1: {e}");
    }
    let Some(pid) = pid else {
        return "SIGUSR1 sent; the main PID is unknown, so the dump file cannot be named".into();
    };
    let file = stack_dump_path(pid);
    if let Some(state) = stopped_state(pid) {
        // A stopped process handles SIGUSR1 only once systemd's stop sends SIGCONT: waiting
        // here would only delay the restart.
        return format!(
            "SIGUSR1 sent; no dump yet: containerd is stopped (state {state}), so it can write one only while systemd stops it"
        );
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if file.exists() {
            info!(path = %file.display(), "goroutine dump written");
            return format!("written to {} and containerd's log", file.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    format!(
        "SIGUSR1 sent; no dump at {} within 500 ms (a frozen containerd cannot write one; with PrivateTmp it lands in the unit's private /tmp)",
        file.display()
    )
}

/// The process's state letter from `/proc/<pid>/stat` when it is stopped (`T`) or stopped
/// by a tracer (`t`); `None` when it runs, sleeps, or cannot be read.
fn stopped_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    process_state(&stat).filter(|state| matches!(state, 'T' | 't'))
}

/// The state field of a `/proc/<pid>/stat` line: the first field after the command name,
/// which is in parentheses and may itself hold spaces and parentheses.
fn process_state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// Where containerd 1.6 writes its goroutine dump, besides its log.
fn stack_dump_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/containerd.{pid}.stacks.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_state_is_read_after_the_last_parenthesis() {
        assert_eq!(process_state("42 (containerd) T 1 42 42 0"), Some('T'));
        assert_eq!(process_state("42 (a) b (c)) S 1"), Some('S'));
        assert_eq!(process_state("42 (truncated"), None);
        assert_eq!(process_state(""), None);
    }

    #[test]
    fn our_own_running_process_is_not_stopped() {
        assert_eq!(stopped_state(std::process::id()), None);
    }
}
