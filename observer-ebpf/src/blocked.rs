//! Blocked threads: `sched_switch` times each uninterruptible sleep (D state) of
//! containerd's and its shims' threads.
//!
//! The hook runs on every context switch of the machine, so the first thing it does is one
//! lookup of the switching-out task's TGID (`current` is still `prev` here) in
//! `BLOCKED_WATCH`; every other task returns there. A watched thread that leaves the CPU in
//! D state gets its entry in `BLOCKED` (thread ID -> since when); one that leaves it in any
//! other state has run since, and loses its entry. The switch-in side is not hooked: that
//! would cost a second lookup on every switch of the machine, while a thread that runs again
//! always leaves the CPU again, and the agent checks each long sleep against the thread's
//! state in `/proc` before it reports one.
//!
//! - `blocked_switch_btf` (`tp_btf/sched_switch`): `preempt` and `prev_state` come as typed
//!   arguments (the latter since 5.18), with no trace record built first.
//! - `blocked_switch` (`sched/sched_switch`): the classic record, where the BTF-typed one does
//!   not load.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, tracepoint},
    maps::HashMap,
    programs::{BtfTracePointContext, TracePointContext},
};
use observer_common::{
    BlockedSleep, MAX_BLOCKED, MAX_BLOCKED_WATCH, counter, reported_uninterruptible,
    sleeps_uninterruptibly,
};

use crate::{count, layout, read};

/// TGIDs whose threads' sleeps are timed: containerd's main PID and its shims, kept by the
/// agent.
#[map]
static BLOCKED_WATCH: HashMap<u32, u8> = HashMap::with_max_entries(MAX_BLOCKED_WATCH, 0);

/// Watched threads asleep in D state, by thread ID.
#[map]
static BLOCKED: HashMap<u32, BlockedSleep> = HashMap::with_max_entries(MAX_BLOCKED, 0);

#[btf_tracepoint(function = "sched_switch")]
pub fn blocked_switch_btf(ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is only tested for presence.
    if unsafe { BLOCKED_WATCH.get(&((pid_tgid >> 32) as u32)) }.is_none() {
        return 0;
    }
    // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
    //              unsigned int prev_state)
    let preempt = ctx.arg::<u64>(0) & 0xff != 0;
    let state = ctx.arg::<u64>(3) as u32;
    record(pid_tgid, sleeps_uninterruptibly(preempt, state));
    0
}

#[tracepoint]
pub fn blocked_switch(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is only tested for presence.
    if unsafe { BLOCKED_WATCH.get(&((pid_tgid >> 32) as u32)) }.is_none() {
        return 0;
    }
    let Some(state) = read::<u32>(&ctx, layout().switch_prev_state) else {
        return 0;
    };
    record(pid_tgid, reported_uninterruptible(state));
    0
}

/// Starts timing the sleep of the thread leaving the CPU, or ends the one it was in.
#[inline(always)]
fn record(pid_tgid: u64, uninterruptible: bool) {
    let tid = pid_tgid as u32;
    if uninterruptible {
        let sleep = BlockedSleep {
            since_ns: unsafe { bpf_ktime_get_ns() },
            tgid: (pid_tgid >> 32) as u32,
            _reserved: 0,
        };
        if BLOCKED.insert(&tid, &sleep, 0).is_err() {
            count(counter::BLOCKED_FULL);
        }
    } else {
        let _ = BLOCKED.remove(&tid);
    }
}
