//! The actuator: carries out the detector's decisions through systemd, and only through it.
//!
//! A restart is `RestartUnit(unit, "replace")` followed by waiting for the job's result and
//! reading the unit's new main PID, so the kernel sensors can follow the new process.

use std::time::{Duration, Instant};

use crate::systemd::Systemd;

/// How long systemd may take to finish a restart job before we report it as stuck.
pub const RESTART_JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// What a restart came to.
#[derive(Debug, Clone)]
pub struct RestartOutcome {
    /// systemd's job result: `done`, `failed`, `timeout`, `canceled`, …; `error` when the
    /// request itself failed.
    pub job_result: String,
    pub error: Option<String>,
    pub duration: Duration,
    pub new_pid: Option<u32>,
}

impl RestartOutcome {
    pub fn succeeded(&self) -> bool {
        self.job_result == "done"
    }
}

/// Restarts the unit and waits for systemd's verdict on the job.
pub async fn restart(systemd: &Systemd) -> RestartOutcome {
    let started = Instant::now();
    let (job_result, error) = match systemd.restart(RESTART_JOB_TIMEOUT).await {
        Ok(result) => (result, None),
        Err(e) => ("error".to_owned(), Some(e.to_string())),
    };
    let new_pid = match systemd.status().await {
        Ok(status) => status.main_pid,
        Err(_) => None,
    };
    RestartOutcome {
        job_result,
        error,
        duration: started.elapsed(),
        new_pid,
    }
}
