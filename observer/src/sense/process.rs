//! A process named by more than its PID. PIDs are reused: a PID read from systemd a moment ago
//! may name another process now. Its start time (field 22 of `/proc/<pid>/stat`, in clock
//! ticks since boot) does not repeat for a PID, so the pair names one process for good.

use std::path::PathBuf;

/// A PID with the start time of the process it named when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    /// `starttime` from `/proc/<pid>/stat`.
    pub start_time: u64,
}

impl ProcessIdentity {
    /// The process that `pid` names now; `None` when there is none (or `/proc` is unreadable).
    pub fn of(pid: u32) -> Option<Self> {
        let stat = read_stat(pid)?;
        Some(Self {
            pid,
            start_time: start_time(&stat)?,
        })
    }

    /// Whether the PID still names this same process (it runs, or is a zombie not reaped yet).
    pub fn is_current(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now == *self)
    }

    /// The process's state letter (`R`, `S`, `T`, …), if the PID still names it.
    pub fn state(&self) -> Option<char> {
        let stat = read_stat(self.pid)?;
        (start_time(&stat)? == self.start_time)
            .then(|| process_state(&stat))
            .flatten()
    }

    /// A directory as the process sees it: through `/proc/<pid>/root`, so that a process in
    /// another mount namespace (the host's containerd, seen from a DaemonSet's pod, or a unit
    /// with `PrivateTmp=`) is looked at in its own filesystem.
    pub fn root_path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root/{}",
            self.pid,
            path.trim_start_matches('/')
        ))
    }
}

fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// The fields after the command name, which is in parentheses and may itself hold spaces
/// and parentheses.
pub(crate) fn fields_after_comm(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace())
}

/// The state field of a `/proc/<pid>/stat` line (field 3).
pub fn process_state(stat: &str) -> Option<char> {
    fields_after_comm(stat)?.next()?.chars().next()
}

/// The start time field of a `/proc/<pid>/stat` line (field 22).
fn start_time(stat: &str) -> Option<u64> {
    // Field 3 is the first after the command; field 22 is 19 further on.
    fields_after_comm(stat)?.nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 12 0 987654 1000 10 18446744073709551615";

    #[test]
    fn fields_are_read_after_the_last_parenthesis() {
        assert_eq!(process_state("42 (containerd) T 1 42 42 0"), Some('T'));
        assert_eq!(process_state(STAT), Some('S'));
        assert_eq!(start_time(STAT), Some(987_654));
        assert_eq!(process_state("42 (truncated"), None);
        assert_eq!(start_time("42 (short) S 1 2"), None);
        assert_eq!(process_state(""), None);
    }

    #[test]
    fn our_own_process_is_identified_and_a_reused_pid_is_not_it() {
        let me = ProcessIdentity::of(std::process::id()).expect("our own /proc entry");
        assert!(me.is_current());
        assert!(me.state().is_some());
        // The same PID with another start time: a process that exited, its PID now reused.
        let earlier = ProcessIdentity {
            start_time: me.start_time.wrapping_sub(1),
            ..me
        };
        assert!(!earlier.is_current());
        assert_eq!(earlier.state(), None);
    }

    #[test]
    fn an_exited_child_is_no_longer_current() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        let identity = ProcessIdentity::of(pid);
        child.wait().expect("wait");
        if let Some(identity) = identity {
            assert!(!identity.is_current(), "reaped: the PID names nothing now");
        }
        assert_eq!(
            ProcessIdentity { pid, start_time: 1 }.root_path("/tmp/x"),
            PathBuf::from(format!("/proc/{pid}/root/tmp/x"))
        );
    }
}
