//! The observer's kernel programs.
//!
//! `process_exit` on `sched/sched_process_exit` tells the agent, within microseconds, that
//! containerd's process is gone. It runs for every thread exit on the node, so it rejects
//! everything but the watched PIDs with one hash lookup before doing anything else, and it
//! logs only for the watched process.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{HashMap, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::info;
use observer_common::{ExitEvent, NO_GROUP_DEAD, is_process_exit};

/// TGIDs to watch; the agent keeps containerd's current main PID here.
#[map]
static WATCHED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Exits of watched processes, for the agent.
#[map]
static EXIT_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024, 0);

/// Offset of `group_dead` in the tracepoint record, read by the agent from the format file
/// at load time; [`NO_GROUP_DEAD`] when this kernel's record has no such field.
#[unsafe(no_mangle)]
static GROUP_DEAD_OFFSET: u32 = NO_GROUP_DEAD;

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    let watched = unsafe { WATCHED_PIDS.get(&tgid) }.is_some();
    if !watched {
        return 0;
    }
    // SAFETY: a plain read of a global the loader set; volatile so the compiler does not fold
    // the default value in.
    let offset = unsafe { core::ptr::read_volatile(&GROUP_DEAD_OFFSET) };
    let group_dead = if offset == NO_GROUP_DEAD {
        None
    } else {
        // SAFETY: the offset comes from this kernel's own format file for this tracepoint.
        match unsafe { ctx.read_at::<u8>(offset as usize) } {
            Ok(v) => Some(v != 0),
            Err(_) => return 0,
        }
    };
    if !is_process_exit(tgid, tid, watched, group_dead) {
        return 0;
    }
    // Rare (containerd's own exit), so a log line costs nothing here.
    info!(
        &ctx,
        "watched process {} exited (last thread {})", tgid, tid
    );
    if let Some(mut entry) = EXIT_EVENTS.reserve::<ExitEvent>(0) {
        let comm = ctx.command().unwrap_or([0; 16]);
        entry.write(ExitEvent {
            monotonic_ns: unsafe { bpf_ktime_get_ns() },
            tgid,
            tid,
            comm,
        });
        entry.submit(0);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
