//! Kernel sensors: loads the eBPF programs, keeps their filters on containerd's current main
//! process and listening sockets, and turns ring-buffer records into [`KernelEvent`]s.
//!
//! Three sensors, each on classic tracepoints (see `observer-ebpf`):
//! - process exit (`sched/sched_process_exit`), with the exit code read through BTF;
//! - exit cause (`signal/signal_generate`, `oom/mark_victim`): who signalled containerd;
//! - accept queue (`sock/sk_data_ready`, `skb/consume_skb`): when connections are queued on
//!   containerd's socket and when containerd accepts them, hence accept latency and the age
//!   of the oldest connection still waiting;
//! - blocked threads (`tp_btf/sched_switch`, else `sched/sched_switch`): since when each of
//!   containerd's and its shims' threads has been in D state ([`BlockedMaps`]).
//!
//! A sensor whose tracepoint, record field or struct offset is missing on this kernel is
//! off with the reason; the others still run.

pub mod btf;
pub mod fentry;
pub mod layout;

use std::{
    collections::HashMap,
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use observer_common::{
    ACCEPT_EVENTS_MAP, ACCEPT_PROGRAM, AcceptEvent, BLOCKED_MAP, BLOCKED_PROGRAM,
    BLOCKED_WATCH_MAP, BlockedSleep, CONNECT_PROGRAM, COUNTERS_MAP, EXIT_CODE_UNKNOWN,
    EXIT_EVENTS_MAP, ExePath, ExitEvent, FOLLOW_EXE_MAP, LAYOUT_GLOBAL, LEARN_MAP, LISTENERS_MAP,
    LearnSlot, MAX_FOLLOW_EXE, MAX_LISTENERS, NO_OFFSET, OOM_PROGRAM, PENDING_MAP,
    PROCESS_EXEC_PROGRAM, PROCESS_EXIT_PROGRAM, PendingConnection, SIGNAL_EVENTS_MAP,
    SIGNAL_PROGRAM, SignalEvent, WATCHED_PIDS_MAP, counter, signal_kind,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::{debug, warn};

use crate::{judge::detector::Source, sense::kernel::btf::Btf};

/// The kernel programs, built from `observer-ebpf` by the build script.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading eBPF programs needs root (CAP_BPF and CAP_PERFMON); run as root or pass --no-ebpf"
    )]
    NotRoot,
    #[error("the kernel refused the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map `{name}` is missing or of the wrong type: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("cannot update an eBPF map: {0}")]
    Update(#[from] aya::maps::MapError),
}

/// Something a kernel program saw.
#[derive(Debug, Clone)]
pub enum KernelEvent {
    Exit(KernelExit),
    Signal(KernelSignal),
    Accept(KernelAccept),
}

/// The whole of a watched process exited.
#[derive(Debug, Clone)]
pub struct KernelExit {
    pub pid: u32,
    /// The thread whose exit ended the process, and its command name.
    pub last_thread: u32,
    pub comm: String,
    /// The kernel's exit code (`status << 8`, or the fatal signal), if readable.
    pub exit_code: Option<u32>,
    /// The last fatal signal or OOM kill aimed at the process, recorded in kernel order.
    pub last_signal: Option<KernelSignal>,
    /// When the kernel ran the exit, on this process's monotonic clock.
    pub at: Instant,
    /// How long the record took from the kernel to the agent.
    pub delivery: Duration,
    /// Which sensor saw it: eBPF, or the pidfd fallback.
    pub source: Source,
}

/// A fatal signal sent to, or an OOM kill of, a watched process.
#[derive(Debug, Clone)]
pub struct KernelSignal {
    pub target: u32,
    /// `None` for an OOM kill.
    pub signal: Option<u32>,
    pub sender_pid: u32,
    pub sender_comm: String,
    pub at: Instant,
}

/// containerd accepted a connection that waited `latency` in its listener's queue.
#[derive(Debug, Clone)]
pub struct KernelAccept {
    pub listener_index: u32,
    pub client_pid: u32,
    pub latency: Duration,
    pub at: Instant,
}

/// Connections waiting in a listener's accept queue, from the kernel's bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingSnapshot {
    pub count: u32,
    pub oldest_age: Option<Duration>,
    /// Connections that waited at the previous look and were accepted since: the accept
    /// loop's progress.
    pub accepted: u32,
}

/// Whether a sensor runs, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensorState {
    pub hook: String,
    /// The kind of hook: `fentry`, `tp_btf` or `tracepoint` (see [`fentry::path`]).
    pub path: Option<&'static str>,
    /// `Ok` with notes about partial data, or `Err` with why the sensor is off.
    pub running: Result<Vec<String>, String>,
}

/// The sensors' states after loading.
#[derive(Debug, Clone)]
pub struct SensorStates {
    pub process_exit: SensorState,
    pub exit_cause: SensorState,
    pub accept_queue: SensorState,
    pub blocked_threads: SensorState,
}

/// Run count and average run time of one program (BPF stats).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramCost {
    pub program: &'static str,
    pub run_count: u64,
    pub run_time: Duration,
}

/// Lets the heartbeat thread tell the connect program which listener it is connecting to.
#[derive(Clone)]
pub struct ListenerLearner {
    learn: Arc<Mutex<Array<MapData, LearnSlot>>>,
}

impl ListenerLearner {
    /// Runs `connect` with the calling thread marked as learning listener `index`.
    pub fn while_connecting<T>(&self, index: u32, connect: impl FnOnce() -> T) -> T {
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() } as u32;
        let Ok(mut learn) = self.learn.lock() else {
            return connect();
        };
        let _ = learn.set(
            0,
            LearnSlot {
                tid,
                listener_index: index,
            },
            0,
        );
        let result = connect();
        let _ = learn.set(0, LearnSlot::default(), 0);
        result
    }
}

/// Loaded and attached kernel programs. Dropping this detaches them.
pub struct KernelSensors {
    watched: BpfHashMap<MapData, u32, u8>,
    listeners: Array<MapData, u64>,
    pending: BpfHashMap<MapData, u64, PendingConnection>,
    /// Per listener, the connections the last look found waiting (skb, queued at): those
    /// gone by the next look were accepted.
    last_seen: HashMap<u32, HashMap<u64, u64>>,
    counters: PerCpuArray<MapData, u64>,
    follow_exe: Option<Array<MapData, ExePath>>,
    learner: Option<ListenerLearner>,
    /// The blocked-thread sensor's maps, until [`KernelSensors::take_blocked`] hands them out.
    blocked: Option<BlockedMaps>,
    states: SensorStates,
    attached: Vec<&'static str>,
    ebpf: Ebpf,
    /// Keeps BPF run-time statistics on while the programs run.
    _stats: Option<OwnedFd>,
}

impl KernelSensors {
    /// Loads the programs, attaches each one it can, and starts forwarding their events.
    pub fn load(events: mpsc::Sender<KernelEvent>) -> Result<Self, KernelError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(KernelError::NotRoot);
        }
        raise_memlock_limit();
        let formats = layout::Formats::read();
        let btf = Btf::from_sys_fs().map_err(|e| e.to_string());
        let offsets = layout::StructOffsets::from_btf(btf.as_ref().map_err(Clone::clone));
        let mut layout = layout::build(&formats, &offsets);
        // The fast path (fentry/fexit, tp_btf) where this kernel allows it; see `fentry`.
        let fast_path_off = fentry::disabled();
        let (fast_exit, fast_accept) = match &fast_path_off {
            Some(reason) => (Err(reason.clone()), Err(reason.clone())),
            None => fentry::fill_layout(&mut layout, btf.as_ref().map_err(Clone::clone)),
        };
        let accept_signature = btf.as_ref().map_or("", fentry::accept_signature);
        debug!(?layout, "kernel layout");
        // Every offset is in `layout` now. The kernel's BTF (5 to 6 MB) is parsed once more,
        // by aya, to load the programs; at most one parsed copy is alive at any time, which
        // is what sets the agent's peak memory.
        drop(btf);
        let mut loader = EbpfLoader::new();
        // `new()` has parsed a copy of its own that the fast path cannot borrow: drop it.
        loader.btf(None);
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"));
        let mut ebpf = loader
            .btf(kernel_btf.as_ref().ok())
            .override_global(LAYOUT_GLOBAL, &layout, true)
            .load(PROGRAMS)?;
        // Messages from the kernel programs join the agent's log stream. The logger must be
        // created before the programs load.
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => warn!("eBPF programs' log messages are unavailable: {e}"),
        }
        let stats = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("BPF run-time statistics are unavailable: {e}");
                None
            }
        };

        let mut attached = Vec::new();
        let mut attach = |ebpf: &mut Ebpf,
                          program: &'static str,
                          tp: &layout::Tracepoint,
                          needs: &[Result<u32, String>]|
         -> Result<(), String> {
            for need in needs {
                need.clone()?;
            }
            tp.fields.clone()?;
            attach_tracepoint(ebpf, program, tp.category, tp.name)?;
            attached.push(program);
            Ok(())
        };

        // Programs of the fast path that run (the `attach` closure records the others).
        let mut fast_programs = Vec::new();
        let mut exit_notes = Vec::new();
        let fast_exit = fast_exit.and_then(|()| {
            fentry::attach_process_exit(&mut ebpf, kernel_btf.as_ref().map_err(Clone::clone)?)
        });
        let (exit_hook, exit_path, process_exit) = match fast_exit {
            Ok(hook) => {
                fast_programs.push(observer_common::PROCESS_EXIT_BTF_PROGRAM);
                (hook, fentry::path::TP_BTF, Ok(()))
            }
            Err(e) => {
                exit_notes.push(format!("tracepoint path: {e}"));
                (
                    "tracepoint sched/sched_process_exit".to_owned(),
                    fentry::path::TRACEPOINT,
                    attach(&mut ebpf, PROCESS_EXIT_PROGRAM, &formats.process_exit, &[]),
                )
            }
        };
        let follow = attach(
            &mut ebpf,
            PROCESS_EXEC_PROGRAM,
            &formats.process_exec,
            &[formats.process_exec.require("filename", 4)],
        );
        if let Err(e) = &follow {
            exit_notes.push(format!(
                "a new containerd is watched once systemd reports its PID, not from its exec: {e}"
            ));
        }
        if exit_path == fentry::path::TRACEPOINT && layout.exit_group_dead == NO_OFFSET {
            exit_notes.push("no group_dead field on this kernel: the thread-group leader's exit stands for the process's exit".to_owned());
        }
        if let Err(e) = &offsets.task_exit_code {
            exit_notes.push(format!(
                "exit code unknown ({e}); systemd's ExecMainStatus stands in"
            ));
        }

        let signals = attach(
            &mut ebpf,
            SIGNAL_PROGRAM,
            &formats.signal_generate,
            &[
                formats.signal_generate.require("sig", 4),
                formats.signal_generate.require("pid", 4),
                formats.signal_generate.require("result", 4),
            ],
        );
        let oom = attach(
            &mut ebpf,
            OOM_PROGRAM,
            &formats.mark_victim,
            &[formats.mark_victim.require("pid", 4)],
        );
        let mut cause_notes = Vec::new();
        if let Err(e) = &oom {
            cause_notes.push(format!("OOM kills are not named: {e}"));
        }

        // The accept queue takes the first tier that loads: fentry/fexit, then BTF-typed
        // tracepoints (the same programs as the classic ones, without a trace record built
        // for every unix wake-up and freed skb on the node), then classic tracepoints.
        let mut queue_notes = Vec::new();
        let typed = fast_accept
            .and_then(|()| {
                let btf = kernel_btf.as_ref().map_err(Clone::clone)?;
                let hook = fentry::attach_accept_queue(&mut ebpf, btf, accept_signature)?;
                Ok((
                    hook,
                    fentry::path::FENTRY,
                    &[
                        observer_common::CONNECT_ENTRY_PROGRAM,
                        observer_common::CONNECT_EXIT_PROGRAM,
                        observer_common::ACCEPT_EXIT_PROGRAM,
                    ][..],
                ))
            })
            .or_else(|e| {
                queue_notes.push(format!("not on fentry: {e}"));
                if let Some(reason) = &fast_path_off {
                    return Err(reason.clone());
                }
                offsets.sock_receive_queue_tail.clone()?;
                offsets.sock_family.clone()?;
                let btf = kernel_btf.as_ref().map_err(Clone::clone)?;
                let hook = fentry::attach_accept_queue_btf(&mut ebpf, btf)?;
                Ok((
                    hook,
                    fentry::path::TP_BTF,
                    &[
                        observer_common::CONNECT_BTF_PROGRAM,
                        observer_common::ACCEPT_BTF_PROGRAM,
                    ][..],
                ))
            });
        let (queue_hook, queue_path, accept) = match typed {
            Ok((hook, path, programs)) => {
                fast_programs.extend(programs);
                (hook, path, Ok(()))
            }
            Err(e) => {
                queue_notes.push(format!("not on tp_btf: {e}"));
                let connect = attach(
                    &mut ebpf,
                    CONNECT_PROGRAM,
                    &formats.sk_data_ready,
                    &[
                        formats.sk_data_ready.require("skaddr", 8),
                        formats.sk_data_ready.require("family", 2),
                        offsets.sock_receive_queue_tail.clone(),
                    ],
                );
                let accept = match &connect {
                    Ok(()) => attach(
                        &mut ebpf,
                        ACCEPT_PROGRAM,
                        &formats.consume_skb,
                        &[formats.consume_skb.require("skbaddr", 8)],
                    ),
                    Err(e) => Err(e.clone()),
                };
                (
                    "tracepoints sock/sk_data_ready (connect queued), skb/consume_skb (accepted)"
                        .to_owned(),
                    fentry::path::TRACEPOINT,
                    accept,
                )
            }
        };

        // Blocked threads: the BTF-typed tracepoint, else the classic one.
        let mut blocked_notes = Vec::new();
        let typed = match &fast_path_off {
            Some(reason) => Err(reason.clone()),
            None => kernel_btf
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|btf| fentry::attach_blocked_btf(&mut ebpf, btf)),
        };
        let (blocked_hook, blocked_path, blocked) = match typed {
            Ok(hook) => {
                fast_programs.push(observer_common::BLOCKED_BTF_PROGRAM);
                (hook, fentry::path::TP_BTF, Ok(()))
            }
            Err(e) => {
                blocked_notes.push(format!("not on tp_btf: {e}"));
                (
                    "tracepoint sched/sched_switch (prev_state of containerd's and its shims' threads)".to_owned(),
                    fentry::path::TRACEPOINT,
                    attach(
                        &mut ebpf,
                        BLOCKED_PROGRAM,
                        &formats.sched_switch,
                        &[formats.sched_switch.require("prev_state", 8)],
                    ),
                )
            }
        };

        attached.extend(fast_programs);
        let states = SensorStates {
            process_exit: SensorState {
                hook: exit_hook,
                path: Some(exit_path),
                running: process_exit.map(|()| exit_notes),
            },
            exit_cause: SensorState {
                hook: "tracepoints signal/signal_generate, oom/mark_victim".into(),
                path: Some(fentry::path::TRACEPOINT),
                running: signals.map(|()| cause_notes),
            },
            accept_queue: SensorState {
                hook: queue_hook,
                path: Some(queue_path),
                running: accept.map(|()| queue_notes),
            },
            blocked_threads: SensorState {
                hook: blocked_hook,
                path: Some(blocked_path),
                running: blocked.clone().map(|()| blocked_notes),
            },
        };
        let blocked = match blocked {
            Ok(()) => Some(BlockedMaps {
                watch: BpfHashMap::try_from(take_map(&mut ebpf, BLOCKED_WATCH_MAP)?)
                    .map_err(|e| map_err(BLOCKED_WATCH_MAP, e))?,
                sleeps: BpfHashMap::try_from(take_map(&mut ebpf, BLOCKED_MAP)?)
                    .map_err(|e| map_err(BLOCKED_MAP, e))?,
            }),
            Err(_) => None,
        };

        let watched = BpfHashMap::try_from(take_map(&mut ebpf, WATCHED_PIDS_MAP)?)
            .map_err(|e| map_err(WATCHED_PIDS_MAP, e))?;
        let listeners = Array::try_from(take_map(&mut ebpf, LISTENERS_MAP)?)
            .map_err(|e| map_err(LISTENERS_MAP, e))?;
        let pending = BpfHashMap::try_from(take_map(&mut ebpf, PENDING_MAP)?)
            .map_err(|e| map_err(PENDING_MAP, e))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, COUNTERS_MAP)?)
            .map_err(|e| map_err(COUNTERS_MAP, e))?;
        let follow_exe = match follow {
            Ok(()) => Some(
                Array::try_from(take_map(&mut ebpf, FOLLOW_EXE_MAP)?)
                    .map_err(|e| map_err(FOLLOW_EXE_MAP, e))?,
            ),
            Err(_) => None,
        };
        let learn =
            Array::try_from(take_map(&mut ebpf, LEARN_MAP)?).map_err(|e| map_err(LEARN_MAP, e))?;
        let learner = states
            .accept_queue
            .running
            .is_ok()
            .then(|| ListenerLearner {
                learn: Arc::new(Mutex::new(learn)),
            });

        forward(
            &mut ebpf,
            EXIT_EVENTS_MAP,
            None,
            events.clone(),
            |e: ExitEvent| {
                let (at, delivery) = monotonic_to_instant(e.monotonic_ns);
                KernelEvent::Exit(KernelExit {
                    pid: e.tgid,
                    last_thread: e.tid,
                    comm: comm_to_string(&e.comm),
                    exit_code: (e.exit_code != EXIT_CODE_UNKNOWN).then_some(e.exit_code),
                    last_signal: (e.last_signal.target != 0).then(|| signal_from(&e.last_signal)),
                    at,
                    delivery,
                    source: Source::Ebpf,
                })
            },
        )?;
        forward(
            &mut ebpf,
            SIGNAL_EVENTS_MAP,
            None,
            events.clone(),
            |e: SignalEvent| {
                KernelEvent::Signal(KernelSignal {
                    target: e.target,
                    signal: (e.kind == signal_kind::SIGNAL).then_some(e.signal),
                    sender_pid: e.sender_tgid,
                    sender_comm: comm_to_string(&e.sender_comm),
                    at: monotonic_to_instant(e.monotonic_ns).0,
                })
            },
        )?;
        forward(
            &mut ebpf,
            ACCEPT_EVENTS_MAP,
            Some(ACCEPT_DRAIN_INTERVAL),
            events,
            |e: AcceptEvent| {
                KernelEvent::Accept(KernelAccept {
                    listener_index: e.listener_index,
                    client_pid: e.client_tgid,
                    latency: Duration::from_nanos(e.accepted_ns.saturating_sub(e.queued_ns)),
                    at: monotonic_to_instant(e.accepted_ns).0,
                })
            },
        )?;

        Ok(Self {
            watched,
            listeners,
            pending,
            last_seen: HashMap::new(),
            counters,
            follow_exe,
            learner,
            blocked,
            states,
            attached,
            ebpf,
            _stats: stats,
        })
    }

    pub fn states(&self) -> &SensorStates {
        &self.states
    }

    /// The handle the heartbeat uses to teach the kernel containerd's listener addresses;
    /// `None` when the accept-queue sensor is off.
    pub fn listener_learner(&self) -> Option<ListenerLearner> {
        self.learner.clone()
    }

    /// The blocked-thread sensor's maps, once; `None` when its program does not run.
    pub fn take_blocked(&mut self) -> Option<BlockedMaps> {
        self.blocked.take()
    }

    /// Points the kernel-side PID filter at `pid` alone. The new PID goes in before the old
    /// ones leave, so there is no moment in which neither is watched.
    pub fn watch_only(&mut self, pid: u32) -> Result<(), KernelError> {
        self.watched.insert(pid, 1, 0)?;
        let stale: Vec<u32> = self
            .watched
            .keys()
            .filter_map(Result::ok)
            .filter(|p| *p != pid)
            .collect();
        for p in stale {
            self.watched.remove(&p)?;
        }
        debug!(pid, "kernel PID filter updated");
        Ok(())
    }

    /// Sets the executables whose exec is watched at once (containerd's binary, as systemd
    /// runs it). Paths that do not fit are skipped.
    pub fn follow_executables(&mut self, paths: &[Vec<u8>]) {
        let Some(map) = self.follow_exe.as_mut() else {
            return;
        };
        let mut slots = paths.iter().filter_map(|p| ExePath::new(p));
        for index in 0..MAX_FOLLOW_EXE {
            let exe = slots.next().unwrap_or(ExePath::EMPTY);
            if let Err(e) = map.set(index, exe, 0) {
                warn!("cannot set the followed executable: {e}");
            }
        }
    }

    /// Connections now waiting on listener `index`, from the kernel's pending map. Entries
    /// of a listener that has since closed (a dead containerd's) are dropped here.
    pub fn pending(&mut self, index: u32) -> PendingSnapshot {
        let current = self.listeners.get(&index, 0).unwrap_or(0);
        let now_ns = monotonic_now_ns();
        let mut snapshot = PendingSnapshot::default();
        let mut stale = Vec::new();
        let mut seen = HashMap::new();
        for entry in &self.pending {
            let Ok((skb, conn)) = entry else { continue };
            if conn.listener_index != index {
                continue;
            }
            if conn.listener != current {
                stale.push(skb);
                continue;
            }
            snapshot.count += 1;
            seen.insert(skb, conn.queued_ns);
            let age = Duration::from_nanos(now_ns.saturating_sub(conn.queued_ns));
            snapshot.oldest_age = Some(snapshot.oldest_age.map_or(age, |o| o.max(age)));
        }
        for skb in stale {
            let _ = self.pending.remove(&skb);
        }
        // An skb address reused by a newer connection carries another queue time.
        let previous = self.last_seen.insert(index, seen).unwrap_or_default();
        let now_seen = &self.last_seen[&index];
        let accepted = previous
            .iter()
            .filter(|(skb, queued)| now_seen.get(*skb) != Some(*queued))
            .count();
        snapshot.accepted = u32::try_from(accepted).unwrap_or(u32::MAX);
        snapshot
    }

    /// Drops the connections recorded as pending on listener `index` for longer than
    /// `older_than`: the kernel's own queue (sock_diag) shows none waiting, so these entries
    /// outlived their accept unseen. Younger ones may be real and newer than that look.
    pub fn purge_pending(&mut self, index: u32, older_than: Duration) -> usize {
        let cutoff = monotonic_now_ns().saturating_sub(older_than.as_nanos() as u64);
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, conn)| conn.listener_index == index && conn.queued_ns <= cutoff)
            .map(|(skb, _)| skb)
            .collect();
        for skb in &stale {
            let _ = self.pending.remove(skb);
        }
        stale.len()
    }

    /// Forgets listener `index`'s address (its containerd is gone); the next heartbeat
    /// learns the new one.
    pub fn forget_listener(&mut self, index: u32) {
        self.last_seen.remove(&index);
        if index < MAX_LISTENERS {
            let _ = self.listeners.set(index, 0, 0);
        }
    }

    /// Events dropped because a ring buffer or the pending map was full, summed over CPUs.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.counter(counter::RING_FULL),
            self.counter(counter::PENDING_FULL),
        )
    }

    /// Sleeps left untimed because the blocked-thread map was full, summed over CPUs.
    pub fn blocked_dropped(&self) -> u64 {
        self.counter(counter::BLOCKED_FULL)
    }

    fn counter(&self, slot: u32) -> u64 {
        self.counters
            .get(&slot, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    /// Run count and total run time of each attached program, from BPF stats.
    pub fn costs(&self) -> Vec<ProgramCost> {
        self.attached
            .iter()
            .filter_map(|name| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some(ProgramCost {
                    program: name,
                    run_count: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect()
    }
}

/// The maps of the blocked-thread program: which processes it watches, and the D-state
/// sleeps of their threads it is timing.
pub struct BlockedMaps {
    watch: BpfHashMap<MapData, u32, u8>,
    sleeps: BpfHashMap<MapData, u32, BlockedSleep>,
}

/// `bpf_map_update_elem` flag (`linux/bpf.h`): insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// A watched thread in D state since `since`, by the kernel's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSleep {
    pub tid: u32,
    pub pid: u32,
    pub since: Instant,
}

impl BlockedMaps {
    /// Times the sleeps of exactly the processes `pids`. New ones go in before the stale
    /// ones leave, as in [`KernelSensors::watch_only`].
    pub fn watch(&mut self, pids: &[u32]) -> Result<(), KernelError> {
        for pid in pids {
            self.watch.insert(pid, 1, 0)?;
        }
        let stale: Vec<u32> = self
            .watch
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !pids.contains(p))
            .collect();
        for p in stale {
            self.watch.remove(&p)?;
        }
        Ok(())
    }

    /// Records thread `tid` of `pid` as asleep since `since`, unless the program already
    /// times a sleep of it: for a thread found in D state when its process starts to be
    /// watched, whose sleep began before any switch the program saw.
    pub fn seed(&mut self, pid: u32, tid: u32, since: Instant) {
        let ago = Instant::now().saturating_duration_since(since);
        let sleep = BlockedSleep {
            since_ns: monotonic_now_ns().saturating_sub(ago.as_nanos() as u64),
            tgid: pid,
            _reserved: 0,
        };
        // The program's own, exact record wins.
        let _ = self.sleeps.insert(tid, sleep, BPF_NOEXIST);
    }

    /// Every sleep the program is timing now.
    pub fn sleeps(&self) -> Vec<KernelSleep> {
        let now_ns = monotonic_now_ns();
        let now = Instant::now();
        self.sleeps
            .iter()
            .filter_map(Result::ok)
            .map(|(tid, sleep)| {
                let ago = Duration::from_nanos(now_ns.saturating_sub(sleep.since_ns));
                KernelSleep {
                    tid,
                    pid: sleep.tgid,
                    since: now.checked_sub(ago).unwrap_or(now),
                }
            })
            .collect()
    }

    /// Drops the record of thread `tid` (its process is no longer watched, or it is gone).
    pub fn forget(&mut self, tid: u32) {
        let _ = self.sleeps.remove(&tid);
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    category: &str,
    name: &str,
) -> Result<(), String> {
    let tp: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} is missing from the object"))?
        .try_into()
        .map_err(|e| format!("program {program}: {e}"))?;
    tp.load()
        .map_err(|e| format!("the kernel refused program {program}: {e}"))?;
    tp.attach(category, name)
        .map_err(|e| format!("cannot attach {program} to tracepoint {category}/{name}: {e}"))?;
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        detail: "not found in the object".into(),
    })
}

fn map_err(name: &'static str, e: aya::maps::MapError) -> KernelError {
    KernelError::Map {
        name,
        detail: e.to_string(),
    }
}

/// Reads `T` records from ring buffer `name` and sends them, converted, to `events`.
/// How often the accept ring is drained even if no batch has woken the reader (its programs
/// submit without a wake-up until a batch has gathered; see `accept_wakeup` in the eBPF crate).
const ACCEPT_DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Reads `name`'s records as they are submitted, and also every `drain_every` when given
/// (for a ring whose programs do not wake the reader for every record).
fn forward<T: Pod + Send + 'static>(
    ebpf: &mut Ebpf,
    name: &'static str,
    drain_every: Option<Duration>,
    events: mpsc::Sender<KernelEvent>,
    convert: impl Fn(T) -> KernelEvent + Send + 'static,
) -> Result<(), KernelError> {
    let ring = RingBuf::try_from(take_map(ebpf, name)?).map_err(|e| map_err(name, e))?;
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd holds it.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
            KernelError::Map {
                name,
                detail: format!("cannot poll it: {e}"),
            }
        })?;
    tokio::spawn(async move {
        let mut drain = drain_every.map(|every| {
            let mut timer = tokio::time::interval(every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer
        });
        loop {
            let batch = tokio::select! {
                ready = ring.readable_mut() => match ready {
                    Ok(mut guard) => {
                        let batch = read_all::<T>(guard.get_inner_mut());
                        guard.clear_ready();
                        batch
                    }
                    Err(e) => {
                        warn!("ring buffer {name} can no longer be polled: {e}");
                        return;
                    }
                },
                _ = tick(drain.as_mut()) => read_all::<T>(ring.get_mut()),
            };
            for record in batch {
                if events.send(convert(record)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Every record in the ring now.
fn read_all<T: Pod>(ring: &mut RingBuf<MapData>) -> Vec<T> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<T>() {
            // SAFETY: the kernel program writes whole `T`s into this ring buffer, the length
            // was checked, and `T: Pod`; the record may be unaligned.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
        }
    }
    batch
}

/// The next tick of `timer`, or never.
async fn tick(timer: Option<&mut tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn signal_from(e: &SignalEvent) -> KernelSignal {
    KernelSignal {
        target: e.target,
        signal: (e.kind == signal_kind::SIGNAL).then_some(e.signal),
        sender_pid: e.sender_tgid,
        sender_comm: comm_to_string(&e.sender_comm),
        at: monotonic_to_instant(e.monotonic_ns).0,
    }
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd holds it.
        let Ok(mut logger) =
            (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) })
        else {
            return;
        };
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Maps a `bpf_ktime_get_ns()` timestamp (CLOCK_MONOTONIC) onto an `Instant`, and says how
/// long ago it was.
fn monotonic_to_instant(ns: u64) -> (Instant, Duration) {
    let now = Instant::now();
    let ago = Duration::from_nanos(monotonic_now_ns().saturating_sub(ns));
    (now.checked_sub(ago).unwrap_or(now), ago)
}

fn comm_to_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so loading does not fail there.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        debug!("could not lift RLIMIT_MEMLOCK; fine on kernels that account BPF memory by cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..10].copy_from_slice(b"containerd");
        assert_eq!(comm_to_string(&comm), "containerd");
    }

    #[test]
    fn kernel_timestamps_map_into_the_past() {
        let (at, ago) = monotonic_to_instant(monotonic_now_ns() - 5_000_000);
        assert!(ago >= Duration::from_millis(5));
        assert!(at <= Instant::now());
    }
}
