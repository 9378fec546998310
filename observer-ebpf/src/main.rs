//! The observer's kernel programs. All hang off classic tracepoints, whose records are the
//! kernel's stable interface; the agent passes every offset in through [`LAYOUT`].
//!
//! - `process_exit` (`sched/sched_process_exit`): containerd's process is gone, with its
//!   exit code.
//! - `signal_generate` (`signal/signal_generate`) and `oom_mark_victim` (`oom/mark_victim`):
//!   who is ending it.
//! - `connect_queued` (`sock/sk_data_ready`) and `accept_consumed` (`skb/consume_skb`): when
//!   a connection is queued on containerd's listening socket and when containerd takes it;
//!   `fentry.rs` has the same two on BTF-typed tracepoints, cheaper where they load.
//! - `blocked_switch` and `blocked_switch_btf` (`sched_switch`, in `blocked.rs`): how long
//!   containerd's and its shims' threads have been in D state.
//!
//! Each runs on every matching event of the whole node, so each rejects foreign events with
//! one comparison or lookup before anything else, and none logs on those paths.
#![no_std]
#![no_main]

mod blocked;
mod fentry;

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::info;
use observer_common::{
    AF_UNIX, AcceptEvent, EXIT_CODE_UNKNOWN, ExePath, ExitEvent, Layout, LearnSlot, MAX_FOLLOW_EXE,
    MAX_LISTENERS, NO_OFFSET, PendingConnection, SignalEvent, counter, is_process_exit,
    is_reported_signal, listener_index, signal_kind,
};

/// TGIDs to watch; the agent keeps containerd's current main PID here.
#[map]
static WATCHED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

#[map]
static EXIT_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024, 0);

#[map]
static LAST_SIGNAL: HashMap<u32, SignalEvent> = HashMap::with_max_entries(64, 0);

#[map]
static SIGNAL_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024, 0);

#[map]
static ACCEPT_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Kernel addresses of the watched listening sockets; 0 marks an empty slot.
#[map]
static LISTENERS: Array<u64> = Array::with_max_entries(MAX_LISTENERS, 0);

#[map]
static LEARN: Array<LearnSlot> = Array::with_max_entries(1, 0);

/// Connections queued on a watched listener and not yet accepted, by `sk_buff` address.
#[map]
static PENDING: HashMap<u64, PendingConnection> = HashMap::with_max_entries(8192, 0);

/// Executables whose exec is followed at once (containerd's binary).
#[map]
static FOLLOW_EXE: Array<ExePath> = Array::with_max_entries(MAX_FOLLOW_EXE, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);

#[unsafe(no_mangle)]
static LAYOUT: Layout = Layout::UNKNOWN;

#[inline(always)]
fn layout() -> Layout {
    // SAFETY: a plain read of a global the loader set; volatile so the compiler does not
    // fold the default in.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn is_watched(tgid: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { WATCHED_PIDS.get(&tgid) }.is_some()
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == NO_OFFSET {
        return None;
    }
    // SAFETY: offsets come from this kernel's own format file for the tracepoint.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_watched(tgid) {
        return 0;
    }
    let tid = pid_tgid as u32;
    let layout = layout();
    let group_dead = if layout.exit_group_dead == NO_OFFSET {
        None
    } else {
        match read::<u8>(&ctx, layout.exit_group_dead) {
            Some(v) => Some(v != 0),
            None => return 0,
        }
    };
    if !is_process_exit(tgid, tid, true, group_dead) {
        return 0;
    }
    let exit_code = if layout.task_exit_code == NO_OFFSET {
        EXIT_CODE_UNKNOWN
    } else {
        // SAFETY: the helper returns the current task; only its address is used here.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        // SAFETY: the offset of task_struct.exit_code comes from this kernel's BTF.
        unsafe { bpf_probe_read_kernel(task.add(layout.task_exit_code as usize).cast::<u32>()) }
            .unwrap_or(EXIT_CODE_UNKNOWN)
    };
    report_exit(&ctx, tgid, tid, exit_code);
    0
}

/// Sends the exit of watched process `tgid`, with the last fatal signal aimed at it, and
/// stops watching it. Shared by the tracepoint and the tp_btf exit programs.
#[inline(always)]
fn report_exit<C: EbpfContext>(ctx: &C, tgid: u32, tid: u32, exit_code: u32) {
    // Rare (containerd's own exit), so a log line costs nothing here.
    info!(
        ctx,
        "watched process {} exited (last thread {}, code {})", tgid, tid, exit_code
    );
    // SAFETY: the entry is copied out before it is removed.
    let last_signal = unsafe { LAST_SIGNAL.get(&tgid) }
        .copied()
        .unwrap_or(SignalEvent {
            monotonic_ns: 0,
            kind: 0,
            target: 0,
            signal: 0,
            sender_tgid: 0,
            sender_comm: [0; 16],
        });
    let _ = LAST_SIGNAL.remove(&tgid);
    // The process is gone: its PID may be reused by anything.
    let _ = WATCHED_PIDS.remove(&tgid);
    match EXIT_EVENTS.reserve::<ExitEvent>(0) {
        Some(mut entry) => {
            entry.write(ExitEvent {
                last_signal,
                monotonic_ns: unsafe { bpf_ktime_get_ns() },
                tgid,
                tid,
                exit_code,
                _reserved: 0,
                comm: ctx.command().unwrap_or([0; 16]),
            });
            entry.submit(0);
        }
        None => count(counter::RING_FULL),
    }
}

/// Watches a process the moment it execs containerd's binary, so a containerd that systemd
/// (or anyone) just started is watched before the agent hears of its PID. Nearly every exec
/// on the node fails the length check and returns without reading the name.
#[tracepoint]
pub fn follow_exec(ctx: TracePointContext) -> u32 {
    let Some(loc) = read::<u32>(&ctx, layout().exec_filename) else {
        return 0;
    };
    let offset = (loc & 0xffff) as usize;
    // The length counts the trailing NUL.
    let len = ((loc >> 16) as usize).saturating_sub(1);
    let mut slot = 0;
    while slot < MAX_FOLLOW_EXE {
        if let Some(exe) = FOLLOW_EXE.get(slot)
            && exe.len as usize == len
            && len > 0
            && len <= exe.bytes.len()
            && filename_matches(&ctx, offset, exe)
        {
            let _ = WATCHED_PIDS.insert(&current_tgid(), &2, 0);
            return 0;
        }
        slot += 1;
    }
    0
}

#[inline(always)]
fn filename_matches(ctx: &TracePointContext, offset: usize, exe: &ExePath) -> bool {
    let mut name = [0u8; 120];
    // SAFETY: the record holds the filename at this offset; the read is bounded by `name`.
    let src = (ctx.as_ptr() as *const u8).wrapping_add(offset);
    if unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_buf(src, &mut name) }.is_err() {
        return false;
    }
    let mut i = 0;
    while i < name.len() {
        if i >= exe.len as usize {
            return true;
        }
        if name[i] != exe.bytes[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    let layout = layout();
    let Some(target) = read::<i32>(&ctx, layout.signal_pid) else {
        return 0;
    };
    if !is_watched(target as u32) {
        return 0;
    }
    let Some(sig) = read::<i32>(&ctx, layout.signal_sig) else {
        return 0;
    };
    if !is_reported_signal(layout.reported_signals, sig as u32) {
        return 0;
    }
    // A signal the kernel dropped or ignored ends nothing.
    if read::<i32>(&ctx, layout.signal_result).unwrap_or(0) != 0 {
        return 0;
    }
    emit_signal(&ctx, signal_kind::SIGNAL, target as u32, sig as u32);
    0
}

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    let Some(target) = read::<i32>(&ctx, layout().oom_pid) else {
        return 0;
    };
    if is_watched(target as u32) {
        emit_signal(&ctx, signal_kind::OOM_VICTIM, target as u32, 0);
    }
    0
}

#[inline(always)]
fn emit_signal(ctx: &TracePointContext, kind: u32, target: u32, signal: u32) {
    let event = SignalEvent {
        monotonic_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        target,
        signal,
        sender_tgid: current_tgid(),
        sender_comm: ctx.command().unwrap_or([0; 16]),
    };
    // An OOM kill stays the cause even if the killer's SIGKILL record follows it.
    // SAFETY: only the kind of the stored entry is read.
    let oom_recorded =
        unsafe { LAST_SIGNAL.get(&target) }.is_some_and(|e| e.kind == signal_kind::OOM_VICTIM);
    if !oom_recorded {
        let _ = LAST_SIGNAL.insert(&target, &event, 0);
    }
    match SIGNAL_EVENTS.reserve::<SignalEvent>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
        }
        None => count(counter::RING_FULL),
    }
}

/// A connection was queued on a listening unix socket: `unix_stream_connect` wakes the
/// listener through `sk_data_ready` right after putting the new connection's skb at the tail
/// of its receive queue, in the connecting task's context.
#[tracepoint]
pub fn connect_queued(ctx: TracePointContext) -> u32 {
    let layout = layout();
    if read::<u16>(&ctx, layout.data_ready_family) != Some(AF_UNIX) {
        return 0;
    }
    let Some(sk) = read::<u64>(&ctx, layout.data_ready_skaddr) else {
        return 0;
    };
    on_connect_queued(sk, &layout, || true);
    0
}

/// What `connect_queued` and its BTF-typed twin do with the woken socket `sk`.
/// `is_unix` is asked only before `sk` is learned as a listener: a socket woken in the
/// heartbeat thread's context by a softirq (TCP, say) must not be taken for one.
#[inline(always)]
pub(crate) fn on_connect_queued(sk: u64, layout: &Layout, is_unix: impl Fn() -> bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // The agent's heartbeat thread teaches us the listener's address: the one socket woken
    // while that thread connects to a configured path is that path's listener.
    if let Some(learn) = LEARN.get(0)
        && learn.tid != 0
        && learn.tid == pid_tgid as u32
        && learn.listener_index < MAX_LISTENERS
        && is_unix()
        && let Some(slot) = LISTENERS.get_ptr_mut(learn.listener_index)
    {
        // SAFETY: array slot owned by this map; a racing writer can only store another
        // address of the same listener.
        unsafe { *slot = sk };
    }
    let mut listeners = [0u64; MAX_LISTENERS as usize];
    let mut i = 0;
    while i < MAX_LISTENERS {
        listeners[i as usize] = LISTENERS.get(i).copied().unwrap_or(0);
        i += 1;
    }
    let Some(index) = listener_index(&listeners, sk) else {
        return;
    };
    if layout.sock_receive_queue_tail == NO_OFFSET {
        return;
    }
    let tail = (sk as *const u8).wrapping_add(layout.sock_receive_queue_tail as usize);
    // SAFETY: offset of sock.sk_receive_queue.prev from this kernel's BTF.
    let Ok(skb) = (unsafe { bpf_probe_read_kernel(tail.cast::<u64>()) }) else {
        return;
    };
    // An empty queue's `prev` points back at the queue head: containerd took the connection
    // before we looked, so there is nothing pending to record.
    let head = sk.wrapping_add(layout.sock_receive_queue_head as u64);
    if skb == 0 || layout.sock_receive_queue_head == NO_OFFSET || skb == head {
        return;
    }
    let pending = PendingConnection {
        queued_ns: unsafe { bpf_ktime_get_ns() },
        listener: sk,
        listener_index: index,
        client_tgid: (pid_tgid >> 32) as u32,
    };
    if PENDING.insert(&skb, &pending, 0).is_err() {
        count(counter::PENDING_FULL);
    }
}

/// containerd consumed an skb: if it is a queued connection we recorded, `unix_accept` just
/// took it off the listener (it frees the connection's skb with `consume_skb`).
#[tracepoint]
pub fn accept_consumed(ctx: TracePointContext) -> u32 {
    if !is_watched(current_tgid()) {
        return 0;
    }
    let Some(skb) = read::<u64>(&ctx, layout().consume_skbaddr) else {
        return 0;
    };
    on_accept_consumed(skb);
    0
}

/// What `accept_consumed` and its BTF-typed twin do with an skb a watched process freed.
#[inline(always)]
pub(crate) fn on_accept_consumed(skb: u64) {
    // SAFETY: the entry is copied out before it is removed.
    let Some(pending) = (unsafe { PENDING.get(&skb) }).copied() else {
        return;
    };
    let _ = PENDING.remove(&skb);
    match ACCEPT_EVENTS.reserve::<AcceptEvent>(0) {
        Some(mut entry) => {
            entry.write(AcceptEvent {
                queued_ns: pending.queued_ns,
                accepted_ns: unsafe { bpf_ktime_get_ns() },
                listener_index: pending.listener_index,
                client_tgid: pending.client_tgid,
            });
            entry.submit(accept_wakeup());
        }
        None => count(counter::RING_FULL),
    }
}

/// Bytes of accept events after which the agent's reader is woken. Accept latencies are
/// statistics, not alarms: waking the reader for each one (an interrupt to another CPU, then
/// a task switch) cost more than the programs themselves under a connection storm. The
/// agent also drains the ring every second, so a lone event waits at most that long.
const ACCEPT_BATCH_BYTES: u64 = 4096;
/// `bpf_ringbuf_query` and `bpf_ringbuf_submit` flags (`linux/bpf.h`).
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// The wake-up flag for the accept event about to be submitted.
#[inline(always)]
pub(crate) fn accept_wakeup() -> u64 {
    if ACCEPT_EVENTS.query(BPF_RB_AVAIL_DATA) >= ACCEPT_BATCH_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
