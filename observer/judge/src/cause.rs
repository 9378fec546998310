//! Names why containerd's process ended, from what the kernel reported: its exit code, the
//! fatal signals sent to it and who sent them, and whether the OOM killer chose it.

use std::time::{Duration, Instant};

use serde::Serialize;

/// A signal (or an OOM kill) aimed at a watched process, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalRecord {
    pub target: u32,
    /// `None` for an OOM kill.
    pub signal: Option<u32>,
    pub sender_pid: u32,
    pub sender_comm: String,
    pub at: Instant,
}

/// Why a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitCause {
    /// Exit status when it exited by itself.
    pub status: Option<u32>,
    /// The fatal signal when one ended it.
    pub signal: Option<u32>,
    pub signal_name: Option<&'static str>,
    pub core_dumped: bool,
    /// Who sent that signal, when the kernel showed it.
    pub sender_pid: Option<u32>,
    pub sender_comm: Option<String>,
    pub oom_killed: bool,
}

/// Signals older than this before the exit are not taken as its cause.
const CAUSE_WINDOW: Duration = Duration::from_secs(30);

/// Explains the exit of `pid` at `exited` from its kernel exit code and recent signals.
pub fn explain(
    pid: u32,
    exit_code: Option<u32>,
    exited: Instant,
    signals: &[SignalRecord],
) -> ExitCause {
    let recent = |r: &&SignalRecord| {
        r.target == pid && r.at <= exited && exited.duration_since(r.at) <= CAUSE_WINDOW
    };
    let oom_killed = signals.iter().filter(recent).any(|r| r.signal.is_none());
    let (status, signal, core_dumped) = match exit_code {
        Some(code) if code & 0x7f == 0 => (Some((code >> 8) & 0xff), None, false),
        Some(code) => (None, Some(code & 0x7f), code & 0x80 != 0),
        None => (None, None, false),
    };
    // The sender of the signal that killed it: the latest one of that number. Without an
    // exit code, the latest reported signal is the best guess.
    let sender = signals
        .iter()
        .filter(recent)
        .filter(|r| r.signal.is_some() && (signal.is_none() || r.signal == signal))
        .max_by_key(|r| r.at);
    let signal = signal.or(if status.is_none() {
        sender.and_then(|s| s.signal)
    } else {
        None
    });
    let sender = sender.filter(|s| s.signal == signal);
    ExitCause {
        status,
        signal,
        signal_name: signal.map(signal_name),
        core_dumped,
        sender_pid: sender.map(|s| s.sender_pid),
        sender_comm: sender.map(|s| s.sender_comm.clone()),
        oom_killed,
    }
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oom_killed {
            f.write_str("killed by the OOM killer")?;
            if let Some(sig) = self.signal {
                write!(f, " ({})", signal_name(sig))?;
            }
            return Ok(());
        }
        match (self.status, self.signal) {
            (Some(status), _) => write!(f, "exited with status {status}"),
            (None, Some(sig)) => {
                write!(f, "killed by signal {sig} ({})", signal_name(sig))?;
                if self.core_dumped {
                    f.write_str(", core dumped")?;
                }
                match (&self.sender_pid, &self.sender_comm) {
                    (Some(pid), Some(comm)) => write!(f, ", sent by pid {pid} ({comm})"),
                    _ => Ok(()),
                }
            }
            (None, None) => f.write_str("exit code unknown"),
        }
    }
}

/// The conventional name of a signal number.
pub fn signal_name(sig: u32) -> &'static str {
    const NAMES: [&str; 32] = [
        "0",
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    NAMES
        .get(sig as usize)
        .copied()
        .unwrap_or("real-time signal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(target: u32, sig: Option<u32>, sender: u32, at: Instant) -> SignalRecord {
        SignalRecord {
            target,
            signal: sig,
            sender_pid: sender,
            sender_comm: "kill".into(),
            at,
        }
    }

    #[test]
    fn sigkill_names_its_sender() {
        let t = Instant::now();
        let signals = [signal(10, Some(9), 4242, t)];
        let cause = explain(10, Some(9), t + Duration::from_millis(1), &signals);
        assert_eq!(cause.signal, Some(9));
        assert_eq!(cause.sender_pid, Some(4242));
        assert_eq!(
            cause.to_string(),
            "killed by signal 9 (SIGKILL), sent by pid 4242 (kill)"
        );
    }

    #[test]
    fn a_plain_exit_reports_its_status_and_no_sender() {
        let t = Instant::now();
        let signals = [signal(10, Some(15), 1, t)];
        let cause = explain(10, Some(1 << 8), t, &signals);
        assert_eq!(cause.status, Some(1));
        assert_eq!(cause.sender_pid, None);
        assert_eq!(cause.to_string(), "exited with status 1");
    }

    #[test]
    fn core_dump_bit_is_decoded() {
        let cause = explain(10, Some(0x80 | 6), Instant::now(), &[]);
        assert_eq!(cause.signal_name, Some("SIGABRT"));
        assert!(cause.core_dumped);
    }

    #[test]
    fn oom_kill_is_named_as_such() {
        let t = Instant::now();
        let signals = [signal(10, None, 77, t), signal(10, Some(9), 77, t)];
        let cause = explain(10, Some(9), t, &signals);
        assert!(cause.oom_killed);
        assert_eq!(cause.to_string(), "killed by the OOM killer (SIGKILL)");
    }

    #[test]
    fn signals_to_other_processes_or_long_ago_are_ignored() {
        let t = Instant::now();
        let signals = [signal(11, Some(9), 1, t), signal(10, Some(9), 2, t)];
        let later = t + CAUSE_WINDOW + Duration::from_secs(1);
        let cause = explain(10, Some(9), later, &signals);
        assert_eq!(cause.sender_pid, None);
    }

    #[test]
    fn without_exit_code_the_latest_signal_stands_in() {
        let t = Instant::now();
        let signals = [
            signal(10, Some(15), 1, t),
            signal(10, Some(9), 2, t + Duration::from_millis(5)),
        ];
        let cause = explain(10, None, t + Duration::from_millis(6), &signals);
        assert_eq!((cause.signal, cause.sender_pid), (Some(9), Some(2)));
    }
}
