//! The fast path: programs on BPF trampolines and BTF-typed tracepoints, which the agent
//! loads where the kernel allows them and replaces with the classic tracepoints where not.
//!
//! - `process_exit_btf` (`tp_btf/sched_process_exit`): the exiting task comes as a typed
//!   argument; the whole process is gone when its `signal_struct.live` reached zero, which
//!   works on kernels whose classic record has no `group_dead` (6.1).
//! - `connect_entry` / `connect_exit` (fentry and fexit on `unix_stream_connect`) and
//!   `accept_exit` (fexit on `unix_accept`): a connection is timed from the moment its client
//!   calls connect until containerd's accept returns it, keyed by the client's socket. The
//!   listener is named by the socket file's dentry, which every connection to it copies.
//!   This needs no `sock/sk_data_ready` tracepoint (6.6+), so it also runs on 6.1.
//!
//! Offsets again come from the agent through `LAYOUT` (BTF, read at load time).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, fentry, fexit},
    programs::{BtfTracePointContext, FEntryContext, FExitContext},
};
use observer_common::{
    AF_UNIX, AcceptEvent, EXIT_CODE_UNKNOWN, IN_FLIGHT, Layout, MAX_LISTENERS, NO_OFFSET,
    PendingConnection, counter, listener_index,
};

use crate::{
    ACCEPT_EVENTS, LEARN, LISTENERS, PENDING, accept_wakeup, count, current_tgid, is_watched,
    layout, on_accept_consumed, on_connect_queued, report_exit,
};

/// Reads a `T` at `offset` bytes into the kernel object at `base`, if the offset is known.
#[inline(always)]
fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == NO_OFFSET {
        return None;
    }
    let field = (base as *const u8)
        .wrapping_add(offset as usize)
        .cast::<T>();
    // SAFETY: the offset is this kernel's, from BTF; the helper checks the address.
    unsafe { bpf_probe_read_kernel(field) }.ok()
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn process_exit_btf(ctx: BtfTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_watched(tgid) {
        return 0;
    }
    let layout = layout();
    let task: u64 = ctx.arg(0);
    // `do_exit` counts the thread out of `signal->live` before this tracepoint: zero means
    // every thread of the process is on its way out.
    let Some(signal) = read_at::<u64>(task, layout.task_signal) else {
        return 0;
    };
    match read_at::<i32>(signal, layout.signal_live) {
        Some(0) => {}
        _ => return 0,
    }
    let exit_code = read_at::<u32>(task, layout.task_exit_code).unwrap_or(EXIT_CODE_UNKNOWN);
    report_exit(&ctx, tgid, pid_tgid as u32, exit_code);
    0
}

/// `connect_queued` on the BTF-typed tracepoint: the woken socket is the first argument,
/// and no trace record is built before the program runs.
#[btf_tracepoint(function = "sk_data_ready")]
pub fn connect_queued_btf(ctx: BtfTracePointContext) -> u32 {
    let layout = layout();
    let sk: u64 = ctx.arg(0);
    on_connect_queued(sk, &layout, || {
        read_at::<u16>(sk, layout.sock_family) == Some(AF_UNIX)
    });
    0
}

/// `accept_consumed` on the BTF-typed tracepoint: the skb is the first argument (also
/// since 6.3, when a second one, the drop location, came after it).
#[btf_tracepoint(function = "consume_skb")]
pub fn accept_consumed_btf(ctx: BtfTracePointContext) -> u32 {
    if !is_watched(current_tgid()) {
        return 0;
    }
    on_accept_consumed(ctx.arg(0));
    0
}

/// The client's socket (`sock->sk`) of a `unix_stream_connect` or `unix_accept` call.
#[inline(always)]
fn sock_of(socket: u64, layout: &Layout) -> Option<u64> {
    read_at::<u64>(socket, layout.socket_sk).filter(|sk| *sk != 0)
}

/// Every unix stream connect on the node starts here: one map insert, undone at its exit
/// unless the connection was queued on a watched listener.
#[fentry(function = "unix_stream_connect")]
pub fn connect_entry(ctx: FEntryContext) -> u32 {
    let layout = layout();
    let Some(sk) = sock_of(ctx.arg(0), &layout) else {
        return 0;
    };
    let pending = PendingConnection {
        queued_ns: unsafe { bpf_ktime_get_ns() },
        listener: 0,
        listener_index: IN_FLIGHT,
        client_tgid: current_tgid(),
    };
    if PENDING.insert(&sk, &pending, 0).is_err() {
        count(counter::PENDING_FULL);
    }
    0
}

#[fexit(function = "unix_stream_connect")]
pub fn connect_exit(ctx: FExitContext) -> u32 {
    let layout = layout();
    let Some(sk) = sock_of(ctx.arg(0), &layout) else {
        return 0;
    };
    let queued = ctx.ret::<i32>() == Ok(0);
    // The server side of the new connection: its path names the listener's socket file.
    let dentry = if queued {
        read_at::<u64>(sk, layout.unix_peer)
            .and_then(|peer| read_at::<u64>(peer, layout.unix_path_dentry))
            .unwrap_or(0)
    } else {
        0
    };
    // The agent's heartbeat thread teaches us each listener's dentry, as in `connect_queued`.
    if dentry != 0
        && let Some(learn) = LEARN.get(0)
        && learn.tid != 0
        && learn.tid == bpf_get_current_pid_tgid() as u32
        && learn.listener_index < MAX_LISTENERS
        && let Some(slot) = LISTENERS.get_ptr_mut(learn.listener_index)
    {
        // SAFETY: array slot owned by this map.
        unsafe { *slot = dentry };
    }
    let index = if dentry == 0 {
        None
    } else {
        listener_index(&listeners(), dentry)
    };
    match (index, PENDING.get_ptr_mut(&sk)) {
        (Some(index), Some(entry)) => {
            // SAFETY: our own entry; containerd's accept may remove it concurrently, in
            // which case this writes to memory the map reclaims after an RCU grace period.
            unsafe {
                (*entry).listener = dentry;
                (*entry).listener_index = index;
            }
        }
        // Already accepted (containerd was faster than this exit), or never inserted.
        (Some(_), None) => {}
        (None, _) => {
            let _ = PENDING.remove(&sk);
        }
    }
    0
}

#[fexit(function = "unix_accept")]
pub fn accept_exit(ctx: FExitContext) -> u32 {
    if !is_watched(current_tgid()) {
        return 0;
    }
    if ctx.ret::<i32>() != Ok(0) {
        return 0;
    }
    let layout = layout();
    // `newsock` is the second argument in every signature (6.1's `int flags, bool kern` and
    // 6.10's `struct proto_accept_arg *` differ only after it).
    let Some(server) = sock_of(ctx.arg(1), &layout) else {
        return 0;
    };
    let Some(client) = read_at::<u64>(server, layout.unix_peer) else {
        return 0;
    };
    // SAFETY: the entry is copied out before it is removed.
    let Some(pending) = (unsafe { PENDING.get(&client) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(&client);
    let dentry = read_at::<u64>(server, layout.unix_path_dentry).unwrap_or(0);
    let Some(index) = listener_index(&listeners(), dentry) else {
        return 0;
    };
    match ACCEPT_EVENTS.reserve::<AcceptEvent>(0) {
        Some(mut entry) => {
            entry.write(AcceptEvent {
                queued_ns: pending.queued_ns,
                accepted_ns: unsafe { bpf_ktime_get_ns() },
                listener_index: index,
                client_tgid: pending.client_tgid,
            });
            entry.submit(accept_wakeup());
        }
        None => count(counter::RING_FULL),
    }
    0
}

#[inline(always)]
fn listeners() -> [u64; MAX_LISTENERS as usize] {
    let mut listeners = [0u64; MAX_LISTENERS as usize];
    let mut i = 0;
    while i < MAX_LISTENERS {
        listeners[i as usize] = LISTENERS.get(i).copied().unwrap_or(0);
        i += 1;
    }
    listeners
}
