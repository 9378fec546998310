//! Types shared by the observer's kernel programs (`observer-ebpf`) and its agent (`observer`).
//!
//! Everything here is `#[repr(C)]` and padding-free, because the kernel side writes these
//! structs into ring buffers and maps byte for byte and the agent reads them back.
//! With the `user` feature the types implement `aya::Pod` so the agent can read them safely.
//! The decision rules the programs apply are plain functions here, so they are unit-tested
//! on the host.
#![no_std]

/// Name of the hash map holding the process IDs (TGIDs) the kernel programs watch.
pub const WATCHED_PIDS_MAP: &str = "WATCHED_PIDS";
/// Ring buffer carrying [`ExitEvent`]s.
pub const EXIT_EVENTS_MAP: &str = "EXIT_EVENTS";
/// Hash map from a watched TGID to the last fatal [`SignalEvent`] aimed at it, so the exit
/// program can name the sender in the same record, in kernel order.
pub const LAST_SIGNAL_MAP: &str = "LAST_SIGNAL";
/// Ring buffer carrying [`SignalEvent`]s (signals to, and OOM kills of, watched processes).
pub const SIGNAL_EVENTS_MAP: &str = "SIGNAL_EVENTS";
/// Ring buffer carrying [`AcceptEvent`]s.
pub const ACCEPT_EVENTS_MAP: &str = "ACCEPT_EVENTS";
/// Array of the watched listening sockets' kernel addresses, indexed by listener number.
pub const LISTENERS_MAP: &str = "LISTENERS";
/// One-slot array telling the connect program which thread is learning which listener.
pub const LEARN_MAP: &str = "LEARN";
/// Hash map from a queued connection's `sk_buff` address to its [`PendingConnection`].
pub const PENDING_MAP: &str = "PENDING";
/// Array of [`ExePath`]s: an exec of one of these files is followed at once (its process is
/// added to the watched PIDs in the kernel), so a containerd that systemd just started is
/// watched before the agent hears of its PID.
pub const FOLLOW_EXE_MAP: &str = "FOLLOW_EXE";
/// How many executable paths can be followed.
pub const MAX_FOLLOW_EXE: u32 = 2;
/// Per-CPU array of counter slots.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Global holding the [`Layout`] the programs read records and kernel structs with.
pub const LAYOUT_GLOBAL: &str = "LAYOUT";

/// Program on `sched/sched_process_exec`.
pub const PROCESS_EXEC_PROGRAM: &str = "follow_exec";
/// Program on `sched/sched_process_exit`.
pub const PROCESS_EXIT_PROGRAM: &str = "process_exit";
/// Program on `signal/signal_generate`.
pub const SIGNAL_PROGRAM: &str = "signal_generate";
/// Program on `oom/mark_victim`.
pub const OOM_PROGRAM: &str = "oom_mark_victim";
/// Program on `sock/sk_data_ready`: a connection was queued on a listener.
pub const CONNECT_PROGRAM: &str = "connect_queued";
/// Program on `skb/consume_skb`: containerd took a queued connection off the listener.
pub const ACCEPT_PROGRAM: &str = "accept_consumed";
/// `connect_queued` on the BTF-typed (raw) tracepoint `tp_btf/sk_data_ready`: no trace
/// record is built for it, which is most of a classic tracepoint's cost.
pub const CONNECT_BTF_PROGRAM: &str = "connect_queued_btf";
/// `accept_consumed` on `tp_btf/consume_skb`.
pub const ACCEPT_BTF_PROGRAM: &str = "accept_consumed_btf";

/// Fast path, program on `tp_btf/sched_process_exit`: a watched process exited (BTF-typed
/// task argument, whole-process exit from `signal_struct.live`).
pub const PROCESS_EXIT_BTF_PROGRAM: &str = "process_exit_btf";
/// Fast path, fentry on `unix_stream_connect`: a unix connection is starting.
pub const CONNECT_ENTRY_PROGRAM: &str = "connect_entry";
/// Fast path, fexit on `unix_stream_connect`: it was queued on a listener, or failed.
pub const CONNECT_EXIT_PROGRAM: &str = "connect_exit";
/// Fast path, fexit on `unix_accept`: containerd took a connection off its listener.
pub const ACCEPT_EXIT_PROGRAM: &str = "accept_exit";
/// `PendingConnection::listener_index` of a connect still inside `unix_stream_connect`.
pub const IN_FLIGHT: u32 = u32::MAX;

/// How many listening sockets can be watched at once.
pub const MAX_LISTENERS: u32 = 4;
/// Offset value meaning "this kernel has no such field".
pub const NO_OFFSET: u32 = u32::MAX;
/// `exit_code` value meaning "unknown" (no BTF offset for `task_struct.exit_code`).
pub const EXIT_CODE_UNKNOWN: u32 = u32::MAX;
/// `AF_UNIX`.
pub const AF_UNIX: u16 = 1;

/// Hash map of the TGIDs whose threads' uninterruptible sleeps are timed: containerd and
/// its shims (not [`WATCHED_PIDS_MAP`], whose members' exits and signals are containerd's).
pub const BLOCKED_WATCH_MAP: &str = "BLOCKED_WATCH";
/// Hash map from a thread ID to the [`BlockedSleep`] it is in now.
pub const BLOCKED_MAP: &str = "BLOCKED";
/// Entries of [`BLOCKED_WATCH_MAP`]: containerd and a few hundred shims.
pub const MAX_BLOCKED_WATCH: u32 = 1024;
/// Entries of [`BLOCKED_MAP`]: every watched thread could be asleep at once.
pub const MAX_BLOCKED: u32 = 8192;
/// The blocked-thread program on the BTF-typed `sched_switch` tracepoint.
pub const BLOCKED_BTF_PROGRAM: &str = "blocked_switch_btf";
/// The blocked-thread program on the classic `sched/sched_switch` tracepoint.
pub const BLOCKED_PROGRAM: &str = "blocked_switch";

/// `TASK_UNINTERRUPTIBLE` (`include/linux/sched.h`): the state `ps` shows as `D`, and bit 1
/// of the classic `sched_switch` record's `prev_state`.
pub const TASK_UNINTERRUPTIBLE: u32 = 0x2;
/// `TASK_NOLOAD`: with `TASK_UNINTERRUPTIBLE` it makes `TASK_IDLE`, an idle kernel thread
/// that `ps` shows as `I`, not `D`.
pub const TASK_NOLOAD: u32 = 0x400;

/// Indexes into [`COUNTERS_MAP`].
pub mod counter {
    /// A ring buffer was full and an event was dropped.
    pub const RING_FULL: u32 = 0;
    /// The pending-connection map was full and a connection went untracked.
    pub const PENDING_FULL: u32 = 1;
    /// The blocked-thread map was full and a sleep went untimed.
    pub const BLOCKED_FULL: u32 = 2;
    /// How many slots the counters array has.
    pub const SLOTS: u32 = 3;
}

/// Where the programs find what they read: field offsets in tracepoint records (from the
/// tracefs format files) and member offsets in kernel structs (from BTF), filled in by the
/// agent at load time so that no offset is baked into the object.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `sched_process_exit.group_dead`, or [`NO_OFFSET`].
    pub exit_group_dead: u32,
    /// `sched_process_exec.filename` (a `__data_loc`: offset in the low, length in the high
    /// 16 bits), or [`NO_OFFSET`].
    pub exec_filename: u32,
    /// `task_struct.exit_code`, or [`NO_OFFSET`].
    pub task_exit_code: u32,
    /// `signal_generate.sig`.
    pub signal_sig: u32,
    /// `signal_generate.pid` (the target task).
    pub signal_pid: u32,
    /// `signal_generate.result`.
    pub signal_result: u32,
    /// `mark_victim.pid`.
    pub oom_pid: u32,
    /// `sk_data_ready.skaddr`.
    pub data_ready_skaddr: u32,
    /// `sk_data_ready.family`.
    pub data_ready_family: u32,
    /// `consume_skb.skbaddr`.
    pub consume_skbaddr: u32,
    /// `sock.sk_receive_queue` + `sk_buff_head.prev`: the newest queued skb, or [`NO_OFFSET`].
    pub sock_receive_queue_tail: u32,
    /// `sock.sk_receive_queue` itself: when the queue is empty its `prev` points here, at
    /// no skb; or [`NO_OFFSET`]. (Also keeps `reported_signals` aligned without padding.)
    pub sock_receive_queue_head: u32,
    /// Bit `n` set: signal `n` is worth reporting (fatal by default).
    pub reported_signals: u64,
    /// Fast path: `task_struct.signal`, or [`NO_OFFSET`].
    pub task_signal: u32,
    /// Fast path: `signal_struct.live` (threads still alive), or [`NO_OFFSET`].
    pub signal_live: u32,
    /// Fast path: `socket.sk`, or [`NO_OFFSET`].
    pub socket_sk: u32,
    /// Fast path: `unix_sock.peer`, or [`NO_OFFSET`].
    pub unix_peer: u32,
    /// Fast path: `unix_sock.path` + `path.dentry`: the socket file a connection was made
    /// to, which names its listener; or [`NO_OFFSET`].
    pub unix_path_dentry: u32,
    /// `sock.__sk_common.skc_family`, for the BTF-typed `sk_data_ready` program, which has
    /// no record with the family in it; or [`NO_OFFSET`].
    pub sock_family: u32,
    /// `sched_switch.prev_state` in the classic record (a `long`; its low 32 bits are read),
    /// or [`NO_OFFSET`].
    pub switch_prev_state: u32,
    /// Zero; keeps the struct free of implicit padding.
    pub _reserved: u32,
}

impl Layout {
    /// Everything unknown: every sensor that needs an offset stays quiet.
    pub const UNKNOWN: Layout = Layout {
        exit_group_dead: NO_OFFSET,
        exec_filename: NO_OFFSET,
        task_exit_code: NO_OFFSET,
        signal_sig: NO_OFFSET,
        signal_pid: NO_OFFSET,
        signal_result: NO_OFFSET,
        oom_pid: NO_OFFSET,
        data_ready_skaddr: NO_OFFSET,
        data_ready_family: NO_OFFSET,
        consume_skbaddr: NO_OFFSET,
        sock_receive_queue_tail: NO_OFFSET,
        sock_receive_queue_head: NO_OFFSET,
        reported_signals: 0,
        task_signal: NO_OFFSET,
        signal_live: NO_OFFSET,
        socket_sk: NO_OFFSET,
        unix_peer: NO_OFFSET,
        unix_path_dentry: NO_OFFSET,
        sock_family: NO_OFFSET,
        switch_prev_state: NO_OFFSET,
        _reserved: 0,
    };
}

/// A watched thread asleep in D state since `since_ns`, as `sched_switch` recorded it when
/// the thread left the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedSleep {
    /// `bpf_ktime_get_ns()` at the switch: CLOCK_MONOTONIC, in nanoseconds.
    pub since_ns: u64,
    /// The thread's process (containerd or a shim).
    pub tgid: u32,
    /// Zero; keeps the struct free of implicit padding.
    pub _reserved: u32,
}

/// Whether a task that leaves the CPU in `state` (the raw `task_struct.__state`, as the
/// BTF-typed `sched_switch` passes it) goes to sleep in D state. A preempted task stays
/// runnable whatever its state says; `TASK_IDLE` is not `D`.
#[inline(always)]
pub fn sleeps_uninterruptibly(preempt: bool, state: u32) -> bool {
    !preempt && state & (TASK_UNINTERRUPTIBLE | TASK_NOLOAD) == TASK_UNINTERRUPTIBLE
}

/// The same from the classic record, whose `prev_state` is already the reported state: one
/// bit per letter of `ps` (D is [`TASK_UNINTERRUPTIBLE`]), and a preempted task's is
/// `TASK_REPORT_MAX`, a bit above them all.
#[inline(always)]
pub fn reported_uninterruptible(prev_state: u32) -> bool {
    prev_state & TASK_UNINTERRUPTIBLE != 0
}

/// The whole of a watched process exited, as `sched_process_exit` reported it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitEvent {
    /// `bpf_ktime_get_ns()` when the event fired: CLOCK_MONOTONIC, in nanoseconds.
    pub monotonic_ns: u64,
    /// The process (thread group) that exited.
    pub tgid: u32,
    /// The thread whose exit ended the process.
    pub tid: u32,
    /// The kernel's `task_struct.exit_code`: `status << 8` for an exit, the signal number
    /// (| 0x80 with a core dump) for a fatal signal; [`EXIT_CODE_UNKNOWN`] if unreadable.
    pub exit_code: u32,
    /// Zero; keeps the struct free of implicit padding.
    pub _reserved: u32,
    /// That thread's command name, NUL-padded.
    pub comm: [u8; 16],
    /// The last fatal signal (or OOM kill) aimed at the process before it exited; all zero
    /// when there was none.
    pub last_signal: SignalEvent,
}

/// What a [`SignalEvent`] reports.
pub mod signal_kind {
    /// A signal was generated for a watched process.
    pub const SIGNAL: u32 = 0;
    /// The OOM killer chose a watched process as its victim.
    pub const OOM_VICTIM: u32 = 1;
}

/// A signal sent to a watched process, or its choice as an OOM victim.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalEvent {
    pub monotonic_ns: u64,
    /// One of [`signal_kind`].
    pub kind: u32,
    /// The watched process.
    pub target: u32,
    /// Signal number (0 for an OOM victim).
    pub signal: u32,
    /// The sending process, or the task that ran the OOM killer.
    pub sender_tgid: u32,
    /// The sender's command name.
    pub sender_comm: [u8; 16],
}

/// A connection queued on a watched listener and not yet accepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingConnection {
    /// When it was queued (CLOCK_MONOTONIC ns).
    pub queued_ns: u64,
    /// The listening socket's kernel address, so that entries of a listener that has since
    /// closed can be told apart and dropped.
    pub listener: u64,
    /// Index of the listener in [`LISTENERS_MAP`].
    pub listener_index: u32,
    /// The connecting process.
    pub client_tgid: u32,
}

/// containerd took a connection off a watched listener's queue.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptEvent {
    pub queued_ns: u64,
    pub accepted_ns: u64,
    pub listener_index: u32,
    pub client_tgid: u32,
}

/// An executable path, as `execve` was given it (NUL-free, at most 120 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExePath {
    /// Length in bytes; 0 marks an empty slot.
    pub len: u32,
    pub _reserved: u32,
    pub bytes: [u8; 120],
}

impl ExePath {
    pub const EMPTY: ExePath = ExePath {
        len: 0,
        _reserved: 0,
        bytes: [0; 120],
    };

    /// The path as an `ExePath`, or `None` if it is too long to follow.
    pub fn new(path: &[u8]) -> Option<ExePath> {
        if path.is_empty() || path.len() > 120 || path.contains(&0) {
            return None;
        }
        let mut e = Self::EMPTY;
        e.len = path.len() as u32;
        e.bytes[..path.len()].copy_from_slice(path);
        Some(e)
    }
}

/// Which thread is connecting to which listener, so the connect program can learn the
/// listener's kernel address from the connection it queues.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LearnSlot {
    /// The agent's heartbeat thread while it connects; 0 otherwise.
    pub tid: u32,
    pub listener_index: u32,
}

#[cfg(feature = "user")]
mod pod {
    // Each of these types is `repr(C)` and `Copy`, has no implicit padding, and every bit
    // pattern is a valid value of it.
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Layout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExitEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SignalEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingConnection {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AcceptEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LearnSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExePath {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlockedSleep {}
}

/// Decides, from one `sched_process_exit` record, whether it is the exit of a whole watched
/// process. `group_dead` is `None` on kernels whose record lacks the field; the thread-group
/// leader's exit then stands in (Go programs end with exit_group, which takes all threads).
#[inline(always)]
pub fn is_process_exit(tgid: u32, tid: u32, watched: bool, group_dead: Option<bool>) -> bool {
    if !watched {
        return false;
    }
    match group_dead {
        Some(dead) => dead,
        None => tid == tgid,
    }
}

/// Whether signal `sig` is in the `reported` bit set.
#[inline(always)]
pub fn is_reported_signal(reported: u64, sig: u32) -> bool {
    sig < 64 && reported & (1u64 << sig) != 0
}

/// Signals whose default action ends a process: the ones worth naming as an exit's cause.
/// SIGURG, SIGPROF and SIGCHLD, which Go's runtime sends and receives all the time, are not.
pub const FATAL_SIGNALS: u64 = {
    let signals = [
        1u32, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 14, 15, 16, 24, 25, 26, 30, 31,
    ];
    let mut mask = 0u64;
    let mut i = 0;
    while i < signals.len() {
        mask |= 1u64 << signals[i];
        i += 1;
    }
    mask
};

/// Finds the slot of listener address `sk` among the watched ones.
#[inline(always)]
pub fn listener_index(listeners: &[u64], sk: u64) -> Option<u32> {
    if sk == 0 {
        return None;
    }
    let mut i = 0;
    while i < listeners.len() {
        if listeners[i] == sk {
            return Some(i as u32);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_structs_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(
            size_of::<ExitEvent>(),
            8 + 4 * 4 + 16 + size_of::<SignalEvent>()
        );
        assert_eq!(size_of::<SignalEvent>(), 8 + 4 * 4 + 16);
        assert_eq!(size_of::<PendingConnection>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<AcceptEvent>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<LearnSlot>(), 8);
        assert_eq!(size_of::<Layout>(), 11 * 4 + 4 + 8 + 8 * 4);
        assert_eq!(size_of::<BlockedSleep>(), 8 + 4 + 4);
        assert_eq!(size_of::<ExePath>(), 128);
    }

    #[test]
    fn only_an_uninterruptible_sleep_is_d_state() {
        // TASK_UNINTERRUPTIBLE, and TASK_KILLABLE (| TASK_WAKEKILL) as in `ps`.
        assert!(sleeps_uninterruptibly(false, 0x2));
        assert!(sleeps_uninterruptibly(false, 0x102));
        // Running, TASK_INTERRUPTIBLE, TASK_IDLE, TASK_DEAD.
        for state in [0x0, 0x1, 0x402, 0x80] {
            assert!(!sleeps_uninterruptibly(false, state), "{state:#x}");
        }
        // Preempted while it was about to sleep: still runnable.
        assert!(!sleeps_uninterruptibly(true, 0x2));
        // The classic record: D, S, R, preempted (TASK_REPORT_MAX), I.
        assert!(reported_uninterruptible(0x2));
        for state in [0x1, 0x0, 0x100, 0x80] {
            assert!(!reported_uninterruptible(state), "{state:#x}");
        }
    }

    #[test]
    fn unwatched_processes_are_ignored() {
        assert!(!is_process_exit(10, 10, false, Some(true)));
    }

    #[test]
    fn thread_exit_is_not_a_process_exit() {
        assert!(!is_process_exit(10, 11, true, Some(false)));
    }

    #[test]
    fn last_thread_of_the_group_ends_the_process_even_if_not_the_leader() {
        assert!(is_process_exit(10, 11, true, Some(true)));
    }

    #[test]
    fn without_group_dead_the_leader_stands_in() {
        assert!(is_process_exit(10, 10, true, None));
        assert!(!is_process_exit(10, 11, true, None));
    }

    #[test]
    fn fatal_signals_exclude_the_go_runtime_chatter() {
        assert!(is_reported_signal(FATAL_SIGNALS, 9));
        assert!(is_reported_signal(FATAL_SIGNALS, 15));
        assert!(is_reported_signal(FATAL_SIGNALS, 6));
        assert!(!is_reported_signal(FATAL_SIGNALS, 23), "SIGURG");
        assert!(!is_reported_signal(FATAL_SIGNALS, 27), "SIGPROF");
        assert!(!is_reported_signal(FATAL_SIGNALS, 17), "SIGCHLD");
        assert!(
            !is_reported_signal(FATAL_SIGNALS, 10),
            "SIGUSR1 asks for a stack dump"
        );
        assert!(!is_reported_signal(FATAL_SIGNALS, 64));
    }

    #[test]
    fn exe_paths_must_fit_and_have_no_nul() {
        assert_eq!(ExePath::new(b"/usr/bin/containerd").unwrap().len, 19);
        assert!(ExePath::new(b"").is_none());
        assert!(ExePath::new(&[b'a'; 121]).is_none());
        assert!(ExePath::new(&[b'/', 0, b'x']).is_none());
    }

    #[test]
    fn listener_lookup_ignores_empty_slots() {
        let listeners = [0, 0xffff_8880_0000_1000, 0, 0];
        assert_eq!(listener_index(&listeners, 0xffff_8880_0000_1000), Some(1));
        assert_eq!(listener_index(&listeners, 0), None);
        assert_eq!(listener_index(&listeners, 0xdead), None);
    }
}
