//! Whether a stop makes progress, from the kernel's view of the old process.
//!
//! A containerd that shuts down closes its listeners and connections, its threads exit, it
//! burns CPU; then it exits. A frozen one (SIGSTOP that systemd's SIGCONT did not reach, a
//! cgroup freezer, a process out of descriptors that cannot finish its shutdown) does none of
//! these. [`OldProcess`] pins the old main process by a pidfd and watches its threads, open
//! descriptors, CPU time and state in `/proc`; a stop that changes none of them for a short
//! while is not going to finish, and waiting out the whole kill-grace only delays recovery.
//!
//! The pidfd is also what the escalation's `SIGKILL` goes through: it can only reach the old
//! process, never the new containerd systemd starts under the same job once the old one is
//! gone (however slowly the new one starts).

use std::{
    fmt, fs,
    time::{Duration, Instant},
};

use crate::sense::{
    fallback::pidfd::PidExitWatch,
    process::{ProcessIdentity, fields_after_comm},
};

/// What `/proc` shows of a process at one moment. Any change between two samples is progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSample {
    /// The state letter of `/proc/<pid>/stat` (`S`, `R`, `D`, `T`, `Z`, …).
    pub state: char,
    pub threads: u64,
    pub descriptors: u64,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
}

impl ProcessSample {
    /// Reads the sample of `pid`; `None` once it is gone (or `/proc` is not readable).
    pub fn read(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let descriptors = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        let mut sample = Self::parse_stat(&stat)?;
        sample.descriptors = descriptors;
        Some(sample)
    }

    /// The state, CPU time and threads of a `/proc/<pid>/stat` line (`descriptors` is 0).
    fn parse_stat(stat: &str) -> Option<Self> {
        let fields: Vec<&str> = fields_after_comm(stat)?.collect();
        // Fields counted from the state (field 3 of proc(5)): utime 14, stime 15, threads 20.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(ProcessSample {
            state: fields.first()?.chars().next()?,
            cpu_ticks: field(14)? + field(15)?,
            threads: field(20)?,
            descriptors: 0,
        })
    }
}

impl fmt::Display for ProcessSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "state {}, {} thread(s), {} descriptor(s), {} CPU tick(s)",
            self.state, self.threads, self.descriptors, self.cpu_ticks
        )
    }
}

/// The old main process of a unit being restarted, pinned by its pidfd.
#[derive(Debug)]
pub struct OldProcess {
    watch: PidExitWatch,
    last: Option<ProcessSample>,
    last_change: Instant,
}

impl OldProcess {
    /// Pins the process `main` by a pidfd. `None` where no pidfd can be had (the process
    /// is gone, its PID taken by another, a kernel without pidfd_open): the caller then
    /// cannot signal it safely by PID.
    pub fn pin(main: ProcessIdentity, now: Instant) -> Option<Self> {
        let watch = PidExitWatch::open(main.pid).ok()?;
        // Checked after the open: if the PID still names that process now, the pidfd does.
        if watch.already_gone() || !main.is_current() {
            return None;
        }
        Some(OldProcess {
            watch,
            last: ProcessSample::read(main.pid),
            last_change: now,
        })
    }

    pub fn pid(&self) -> u32 {
        self.watch.pid()
    }

    /// Whether the process has exited (a zombie counts).
    pub fn exited(&self) -> bool {
        self.watch.has_exited() || self.last.is_some_and(|s| s.state == 'Z')
    }

    /// Samples the process and returns for how long it has shown no progress at `now`.
    pub fn observe(&mut self, now: Instant) -> Duration {
        if self.exited() {
            self.last_change = now;
            return Duration::ZERO;
        }
        let sample = ProcessSample::read(self.pid());
        if sample != self.last {
            self.last = sample;
            self.last_change = now;
        }
        now.saturating_duration_since(self.last_change)
    }

    /// The last sample, for the record.
    pub fn last(&self) -> Option<ProcessSample> {
        self.last
    }

    /// `SIGKILL` through the pidfd: `Ok(false)` when the process had already exited.
    pub fn kill(&self) -> std::io::Result<bool> {
        self.watch.send_signal(rustix::process::Signal::KILL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice num_threads …
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 9 0 1234";
        let sample = ProcessSample::parse_stat(stat).unwrap();
        assert_eq!(sample.state, 'S');
        assert_eq!(sample.cpu_ticks, 12);
        assert_eq!(sample.threads, 9);
        assert_eq!(ProcessSample::parse_stat("42 (truncated"), None);
    }

    #[tokio::test]
    async fn a_sleeping_process_shows_no_progress_and_dies_by_its_pidfd() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let t0 = Instant::now();
        // A process just spawned is still starting (exec, loading): it makes progress until it
        // settles in its sleep. Pin it again until two samples agree.
        let mut old = None;
        for _ in 0..100 {
            let main = ProcessIdentity::of(child.id()).expect("its /proc entry");
            let mut pinned = OldProcess::pin(main, t0).expect("a pidfd");
            std::thread::sleep(Duration::from_millis(50));
            // The clock is the caller's: the same unchanged process, a second later.
            if pinned.observe(t0 + Duration::from_secs(1)) == Duration::from_secs(1) {
                old = Some(pinned);
                break;
            }
        }
        let mut old = old.expect("a sleeping process settles and shows no progress");
        assert_eq!(old.last().map(|s| s.threads), Some(1));
        assert!(old.kill().expect("SIGKILL"));
        child.wait().expect("reap");
        assert!(old.exited());
        assert_eq!(old.observe(t0 + Duration::from_secs(2)), Duration::ZERO);
        assert!(!old.kill().expect("no error once gone"));
    }
}
