//! Types shared by the observer's kernel programs (`observer-ebpf`) and its agent (`observer`).
//!
//! Everything here is `#[repr(C)]` and padding-free, because the kernel side writes these
//! structs into ring buffers and maps byte for byte and the agent reads them back.
//! With the `user` feature the types implement `aya::Pod` so the agent can read them safely.
#![no_std]

/// Name of the hash map holding the process IDs (TGIDs) the kernel programs watch.
pub const WATCHED_PIDS_MAP: &str = "WATCHED_PIDS";
/// Name of the ring buffer carrying [`ExitEvent`]s to the agent.
pub const EXIT_EVENTS_MAP: &str = "EXIT_EVENTS";
/// Name of the program attached to `sched/sched_process_exit`.
pub const PROCESS_EXIT_PROGRAM: &str = "process_exit";
/// Global holding the offset of `group_dead` in the `sched_process_exit` record.
pub const GROUP_DEAD_OFFSET_GLOBAL: &str = "GROUP_DEAD_OFFSET";
/// Value of [`GROUP_DEAD_OFFSET_GLOBAL`] on kernels whose record has no `group_dead` field:
/// the program then treats the thread-group leader's exit as the process's exit.
pub const NO_GROUP_DEAD: u32 = u32::MAX;

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
    /// That thread's command name, NUL-padded.
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: `ExitEvent` is `repr(C)`, `Copy`, has no padding (8 + 4 + 4 + 16 bytes) and every
// bit pattern is a valid value.
unsafe impl aya::Pod for ExitEvent {}

/// Decides, from one `sched_process_exit` record, whether it is the exit of a whole watched
/// process. Kept here, free of kernel helpers, so the rule is unit-tested on the host.
///
/// `group_dead` is `None` on kernels whose record lacks the field; the leader's exit stands in.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_event_has_no_padding() {
        assert_eq!(core::mem::size_of::<ExitEvent>(), 8 + 4 + 4 + 16);
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
}
