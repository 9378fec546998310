//! The actuator: carries out the detector's decisions through systemd, and only through it.
//!
//! Before acting it reads the unit as systemd sees it and never fights it: a unit systemd is
//! already restarting is left to systemd, a unit an operator stopped stays stopped. [`plan`]
//! is that rule, free of I/O. A restart of a hung containerd escalates: an optional goroutine
//! dump (`SIGUSR1`), `RestartUnit(fail)`, and, if the stop makes no progress (see
//! [`super::stop`]) or outlasts `kill-grace`, a `SIGKILL` of the old main process through its
//! pidfd rather than waiting out `TimeoutStopSec`. The pidfd names the old process only, so a
//! new containerd that is slow to start is never killed.

#[cfg(test)]
use std::path::Path;
use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tracing::{info, warn};

use crate::{
    act::{
        stop::OldProcess,
        systemd::{Systemd, SystemdError, UnitStatus},
    },
    judge::detector::State,
    sense::process::ProcessIdentity,
};

#[derive(Debug, Clone)]
pub struct ActuatorConfig {
    /// How long a hung stop may take before the main process is killed: the upper bound.
    pub kill_grace: Duration,
    /// How long a stop may show no progress at all (the old process's threads, descriptors,
    /// CPU time and state unchanged) before it is cut short, within `kill_grace`.
    pub stop_stall: Duration,
    /// How long a whole restart job may take before it is reported as stuck.
    pub job_timeout: Duration,
    /// Ask a hung containerd for its goroutine dump before restarting it.
    pub dump_stacks: bool,
    /// How long to wait for that dump before the restart.
    pub stack_dump_wait: Duration,
    /// How long to wait for systemd to notice a crash before judging the unit's state.
    pub settle: Duration,
}

impl Default for ActuatorConfig {
    fn default() -> Self {
        Self {
            kill_grace: Duration::from_secs(10),
            stop_stall: Duration::from_secs(1),
            job_timeout: Duration::from_secs(120),
            dump_stacks: true,
            stack_dump_wait: Duration::from_millis(500),
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
    /// The stop hung and the old main process was killed.
    pub killed_main: bool,
    /// Why and how the stop was cut short, when it was.
    pub escalation: Option<String>,
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

/// Prepares the restart of a hung containerd: asks it for its goroutine dump (when
/// configured) and waits for it up to `stack_dump_wait`. Returns what became of the dump.
pub async fn prepare(
    systemd: &Systemd,
    config: &ActuatorConfig,
    verdict: State,
    main: Option<ProcessIdentity>,
) -> Option<StackDump> {
    if !config.dump_stacks || !matches!(verdict, State::Hung | State::StartupHung) {
        return None;
    }
    Some(request_stack_dump(systemd, main, config.stack_dump_wait).await)
}

/// Restarts the unit, escalating as the verdict warrants, and waits for systemd's result.
/// `main` is the unit's main process before the restart: the one process a hanging stop may
/// kill.
pub async fn restart(
    systemd: &Systemd,
    config: &ActuatorConfig,
    main: Option<ProcessIdentity>,
    mut stack_dump: Option<StackDump>,
) -> RestartOutcome {
    let started = Instant::now();
    // Pinned before the stop begins: whatever the escalation kills is this process.
    let mut old = main.and_then(|main| OldProcess::pin(main, Instant::now()));
    // A live main process that could not be pinned (no pidfd_open on this kernel).
    let unpinned = main
        .filter(|main| old.is_none() && main.is_current())
        .map(|main| main.pid);
    let mut killed_main = false;
    let mut escalation = None;
    let (job_result, error) = match systemd.begin_restart().await {
        Err(e) => ("error".to_owned(), Some(e.to_string())),
        Ok(mut job) => {
            let stop_began = Instant::now();
            let mut outcome = Ok(None);
            // Until the old process is gone or killed: wait for the job in short steps and
            // watch whether the stop makes progress.
            while let Some(process) = old.as_mut() {
                let waited = stop_began.elapsed();
                outcome = job
                    .wait(STOP_SAMPLE.min(config.kill_grace.saturating_sub(waited)))
                    .await;
                if !matches!(outcome, Ok(None)) || process.exited() {
                    break;
                }
                let still = process.observe(Instant::now());
                let waited = stop_began.elapsed();
                let stalled = still >= config.stop_stall.min(config.kill_grace);
                if !stalled && waited < config.kill_grace {
                    continue;
                }
                let why = if stalled {
                    format!(
                        "the stop made no progress for {:.1} s ({})",
                        still.as_secs_f64(),
                        process.last().map(|s| s.to_string()).unwrap_or_default()
                    )
                } else {
                    format!(
                        "the stop still ran after kill-grace ({:?})",
                        config.kill_grace
                    )
                };
                warn!(job = %job.path(), pid = process.pid(), "{why}: killing the old process through its pidfd");
                match process.kill() {
                    Ok(true) => {
                        killed_main = true;
                        escalation = Some(format!(
                            "{why}: SIGKILL to the old process {} through its pidfd after {:.1} s",
                            process.pid(),
                            waited.as_secs_f64()
                        ));
                    }
                    Ok(false) => {}
                    Err(e) => warn!("pidfd_send_signal failed: {e}"),
                }
                old = None;
            }
            if matches!(outcome, Ok(None))
                && let Some(pid) = unpinned
            {
                // Without a pidfd, a kill by PID is safe only while systemd is still stopping
                // that very process: checked at kill-grace, just before the kill.
                outcome = job.wait(until(stop_began + config.kill_grace)).await;
                if matches!(outcome, Ok(None))
                    && let Some(note) = kill_if_still_stopping(systemd, pid).await
                {
                    killed_main = true;
                    escalation = Some(note);
                }
            }
            if matches!(outcome, Ok(None)) {
                outcome = job.wait(until(stop_began + config.job_timeout)).await;
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
    if let Some(dump) = &mut stack_dump {
        dump.look_again();
    }
    RestartOutcome {
        job_result,
        error,
        duration: started.elapsed(),
        new_pid,
        stack_dump: stack_dump.map(|d| d.note),
        killed_main,
        escalation,
    }
}

/// How often a hanging stop is sampled.
const STOP_SAMPLE: Duration = Duration::from_millis(100);

/// The time left until `deadline`, zero once it has passed.
fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// `KillUnit(main, SIGKILL)`, but only while systemd is still stopping `pid`: once the old
/// process is gone, systemd's main process is the new containerd, which may just be slow to
/// start, and must not be killed. Returns what was done, for the record.
async fn kill_if_still_stopping(systemd: &Systemd, pid: u32) -> Option<String> {
    let status = systemd.status().await.ok()?;
    if status.active_state != "deactivating" || status.main_pid != Some(pid) {
        return None;
    }
    match systemd.kill_main(libc::SIGKILL).await {
        Ok(()) => Some(format!(
            "the stop still ran after kill-grace and {pid} was still the unit's main process: SIGKILL through systemd (no pidfd here)"
        )),
        Err(e) => {
            warn!("KillUnit failed: {e}");
            None
        }
    }
}

/// A goroutine dump asked for, and where it went.
#[derive(Debug)]
pub struct StackDump {
    /// What became of it, in words.
    pub note: String,
    /// Where to look for it again, while it has not appeared yet.
    pending: Option<DumpFile>,
}

/// The dump file of one containerd process: `<tmp>/containerd.<pid>.stacks.log` in that
/// process's own `/tmp`, which in a DaemonSet's pod (or with `PrivateTmp=`) is not ours.
#[derive(Debug)]
struct DumpFile {
    /// The path as containerd names it, for people.
    shown: PathBuf,
    /// containerd's `/tmp`, opened through `/proc/<pid>/root` while the process lived: it
    /// stays reachable through this handle after the process exits.
    tmp: std::fs::File,
    name: String,
    /// When SIGUSR1 was sent: a file older than that is an earlier process's (same PID).
    asked_at: SystemTime,
}

impl DumpFile {
    fn open(main: &ProcessIdentity, asked_at: SystemTime) -> std::io::Result<Self> {
        let tmp = std::fs::File::open(main.root_path("/tmp"))?;
        Ok(Self {
            shown: stack_dump_path(main.pid),
            tmp,
            name: format!("containerd.{}.stacks.log", main.pid),
            asked_at,
        })
    }

    /// Whether the dump is there, written after it was asked for.
    fn written(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let path = format!("/proc/self/fd/{}/{}", self.tmp.as_raw_fd(), self.name);
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified >= self.asked_at - Duration::from_secs(1))
    }
}

impl StackDump {
    fn done(note: String) -> Self {
        Self {
            note,
            pending: None,
        }
    }

    /// Looks for a dump not found before; notes it if it appeared meanwhile.
    fn look_again(&mut self) {
        if let Some(file) = self.pending.take_if(|file| file.written()) {
            self.note = format!(
                "written to {} (in containerd's /tmp) and containerd's log while it was being stopped",
                file.shown.display()
            );
        }
    }
}

/// Asks containerd for its goroutine dump and says where it went. containerd 1.6 writes it
/// to its log and to `<tmp>/containerd.<pid>.stacks.log`; a frozen process cannot answer.
async fn request_stack_dump(
    systemd: &Systemd,
    main: Option<ProcessIdentity>,
    wait: Duration,
) -> StackDump {
    let Some(main) = main else {
        return StackDump::done(
            "no SIGUSR1 sent: the main PID is unknown, so the dump file cannot be named".into(),
        );
    };
    // The PID came from systemd a while ago: check it still names that process before its
    // files are trusted (systemd signals the unit's current main process either way).
    if !main.is_current() {
        return StackDump::done(format!(
            "no SIGUSR1 sent: PID {} no longer names the process systemd reported",
            main.pid
        ));
    }
    let asked_at = SystemTime::now();
    let file = DumpFile::open(&main, asked_at);
    if let Err(e) = systemd.kill_main(libc::SIGUSR1).await {
        return StackDump::done(format!("could not send SIGUSR1: {e}"));
    }
    let file = match file {
        Ok(file) => file,
        Err(e) => {
            return StackDump::done(format!(
                "SIGUSR1 sent; containerd's /tmp cannot be read through /proc/{}/root ({e}): the dump is in its log only",
                main.pid
            ));
        }
    };
    if let Some(state) = main.state().filter(|s| matches!(s, 'T' | 't')) {
        // A stopped process handles SIGUSR1 only once systemd's stop sends SIGCONT: waiting
        // here would only delay the restart.
        return StackDump {
            note: format!(
                "SIGUSR1 sent; no dump yet: containerd is stopped (state {state}), so it can write one only while systemd stops it"
            ),
            pending: Some(file),
        };
    }
    let deadline = Instant::now() + wait;
    loop {
        if file.written() {
            info!(path = %file.shown.display(), "goroutine dump written");
            return StackDump::done(format!(
                "written to {} (in containerd's /tmp) and containerd's log",
                file.shown.display()
            ));
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    StackDump {
        note: format!(
            "SIGUSR1 sent; no dump at {} within {wait:?} (a frozen containerd cannot write one)",
            file.shown.display()
        ),
        pending: Some(file),
    }
}

/// Where containerd 1.6 writes its goroutine dump, besides its log, in its own `/tmp`.
fn stack_dump_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/containerd.{pid}.stacks.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_file_older_than_the_request_is_not_the_dump() {
        let me = ProcessIdentity::of(std::process::id()).expect("our /proc entry");
        let name = format!("containerd.{}.stacks.log", me.pid);
        let path = std::env::temp_dir().join(&name);
        std::fs::write(&path, "old dump").unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        let stale = DumpFile::open(&me, later).expect("our own /tmp");
        let fresh = DumpFile::open(&me, SystemTime::now() - Duration::from_secs(5)).unwrap();
        let (stale_written, fresh_written) = (stale.written(), fresh.written());
        std::fs::remove_file(&path).unwrap();
        if std::env::temp_dir() == Path::new("/tmp") {
            assert!(
                !stale_written,
                "a file from before SIGUSR1 belongs to an earlier process"
            );
            assert!(fresh_written, "found through /proc/<pid>/root/tmp");
        }
    }
}
