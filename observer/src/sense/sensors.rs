//! The sensors the agent runs besides the probe, and the fallbacks that stand in for each
//! kernel program that cannot run here.
//!
//! | sensor        | with eBPF                                   | without eBPF                  |
//! |---------------|---------------------------------------------|-------------------------------|
//! | process exit  | `sched_process_exit` tracepoint             | pidfd of the main PID         |
//! | exit cause    | `signal_generate`, `mark_victim` tracepoints | systemd's exit status only    |
//! | accept queue  | `sk_data_ready` + `consume_skb` tracepoints | sock_diag `UNIX_DIAG_RQLEN`   |
//! | blocked threads | `sched_switch` tracepoint (`prev_state`)  | `/proc/<pid>/task/*/stat` sampling |
//!
//! Where the kernel allows it, process exit and blocked threads run on `tp_btf` and the
//! accept queue on fentry/fexit instead of the tracepoints (`kernel::fentry`); `path` in
//! `/status` says which.
//!
//! `--no-ebpf` turns all of them off (the polling-only baseline) but the `/proc` sampling of
//! blocked threads, which loads nothing; `--fallback-sensors` forces the right-hand column.
//! Either way the heartbeat keeps the queue signal alive.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{debug, warn};

use crate::{
    config::Settings,
    judge::detector::Source,
    report::status::{HeartbeatRecord, ProgramRecord, SensorStatus, Sensors as SensorsRecord},
    sense::blocked::{BlockedSample, BlockedSampler},
    sense::fallback::pidfd::PidExitWatch,
    sense::fallback::sockdiag::{self, PendingTracker},
    sense::heartbeat::Heartbeat,
    sense::kernel::{
        KernelEvent, KernelExit, KernelSensors, PendingSnapshot, ProgramCost, SensorState,
    },
    sense::process::ProcessIdentity,
};

/// The blocked-thread sensor's fallback, as `/status` names it.
const PROCFS_BLOCKED: &str = "/proc/<pid>/task/*/stat and wchan sampling";

/// Pending ages from this on are checked against the kernel's accept queue (sock_diag).
const STALE_CHECK_AGE: Duration = Duration::from_millis(500);

/// How the accept queue is watched.
enum QueueWatch {
    Ebpf,
    /// One tracker per listening socket (by inode), for each configured path.
    SockDiag(Vec<HashMap<u64, PendingTracker>>),
    Off,
}

/// All sensors but the probe.
pub struct Sensors {
    kernel: Option<KernelSensors>,
    /// The main PID the sensors follow (the latest one named).
    followed: Option<u32>,
    exit_by_pidfd: bool,
    queue: QueueWatch,
    listeners: Vec<PathBuf>,
    events: mpsc::Sender<KernelEvent>,
    pidfd_task: Option<JoinHandle<()>>,
    heartbeat: Option<Heartbeat>,
    heartbeat_interval: Duration,
    record: SensorsRecord,
    /// The programs' statistics as last read (reading them costs a syscall per program).
    costs: Vec<ProgramCost>,
    blocked: BlockedSampler,
}

impl Sensors {
    /// Starts every sensor the settings and this machine allow; events go to `events`.
    pub fn start(settings: &Settings, events: mpsc::Sender<KernelEvent>) -> Self {
        let mut record = SensorsRecord {
            process_exit: off("pidfd", "--no-ebpf: probes only"),
            exit_cause: off("systemd ExecMainStatus", "--no-ebpf: probes only"),
            accept_queue: off("sock_diag", "--no-ebpf: probes only"),
            blocked_threads: fallback(PROCFS_BLOCKED, "--no-ebpf: no kernel programs"),
        };
        let mut sensors = Self {
            kernel: None,
            followed: None,
            exit_by_pidfd: false,
            queue: QueueWatch::Off,
            listeners: settings.listeners.clone(),
            events: events.clone(),
            pidfd_task: None,
            heartbeat: None,
            heartbeat_interval: settings.heartbeat_interval,
            record: record.clone(),
            costs: Vec::new(),
            blocked: BlockedSampler::new(&settings.socket),
        };
        if settings.no_ebpf {
            return sensors;
        }
        let mut kernel = if settings.fallback_sensors {
            Err("--fallback-sensors".to_owned())
        } else {
            KernelSensors::load(events).map_err(|e| e.to_string())
        };
        release_freed_heap();
        let (exit, cause, queue, blocked) = match &kernel {
            Ok(k) => {
                let s = k.states();
                (
                    s.process_exit.clone(),
                    s.exit_cause.clone(),
                    s.accept_queue.clone(),
                    s.blocked_threads.clone(),
                )
            }
            Err(reason) => {
                warn!("eBPF is unavailable ({reason}); falling back to pidfd and sock_diag");
                let down = SensorState {
                    hook: String::new(),
                    path: None,
                    running: Err(format!("eBPF unavailable: {reason}")),
                };
                (down.clone(), down.clone(), down.clone(), down)
            }
        };
        record.process_exit = match exit.running {
            Ok(notes) => on(&exit.hook, exit.path, notes),
            Err(reason) => {
                sensors.exit_by_pidfd = true;
                fallback("pidfd_open(2) on the main PID", &reason)
            }
        };
        record.exit_cause = match cause.running {
            Ok(notes) => on(&cause.hook, cause.path, notes),
            Err(reason) => off(
                "systemd ExecMainStatus",
                &format!("{reason}; the exit status comes from systemd after the fact"),
            ),
        };
        let learner = kernel
            .as_ref()
            .ok()
            .and_then(KernelSensors::listener_learner);
        record.accept_queue = match queue.running {
            Ok(notes) => {
                sensors.queue = QueueWatch::Ebpf;
                on(&queue.hook, queue.path, notes)
            }
            Err(reason) => {
                sensors.queue = QueueWatch::SockDiag(
                    settings.listeners.iter().map(|_| HashMap::new()).collect(),
                );
                let mut status = fallback(
                    "sock_diag UNIX_DIAG_RQLEN/ICONS sampling (no accept latency)",
                    &reason,
                );
                status.notes.push(
                    "pending ages are measured from the first sample that showed a connection"
                        .into(),
                );
                status
            }
        };
        let maps = kernel.as_mut().ok().and_then(KernelSensors::take_blocked);
        record.blocked_threads = match (blocked.running, maps) {
            (Ok(notes), Some(maps)) => {
                sensors.blocked = BlockedSampler::with_kernel(&settings.socket, maps);
                on(&blocked.hook, blocked.path, notes)
            }
            (Ok(_), None) => fallback(PROCFS_BLOCKED, "the blocked-thread maps were taken"),
            (Err(reason), _) => {
                let mut status = fallback(PROCFS_BLOCKED, &reason);
                status.notes.push(
                    "blocked durations are measured from the first sample that showed the thread in D state"
                        .into(),
                );
                status
            }
        };
        match Heartbeat::spawn(
            settings.listeners.clone(),
            settings.heartbeat_interval,
            learner,
        ) {
            Ok(h) => sensors.heartbeat = Some(h),
            Err(e) => warn!("cannot start the heartbeat thread: {e}"),
        }
        sensors.kernel = kernel.ok();
        sensors.record = record;
        sensors
    }

    /// Whether any kernel-side sensor runs (eBPF or its fallbacks).
    pub fn any_kernel_sensor(&self) -> bool {
        self.kernel.is_some() || self.exit_by_pidfd || !matches!(self.queue, QueueWatch::Off)
    }

    pub fn ebpf_loaded(&self) -> bool {
        self.kernel.is_some()
    }

    /// Moves the sensors to containerd's new main process.
    /// `identity` is the process as it was when systemd named it: the pidfd fallback checks
    /// that the PID still names it.
    pub fn follow(&mut self, pid: Option<u32>, identity: Option<ProcessIdentity>) {
        let replaced = self.followed.is_some_and(|old| Some(old) != pid);
        let first = self.followed.is_none() && pid.is_some();
        if pid.is_some() {
            self.followed = pid;
        }
        if let Some(kernel) = self.kernel.as_mut() {
            // A new process has new listening sockets; the next heartbeat learns them, and
            // connections queued on the old ones are no longer counted. The first PID keeps
            // what the heartbeat learned already: under a storm of connections the queue may
            // stay full, and a heartbeat that gets EAGAIN learns nothing.
            if replaced {
                for index in 0..self.listeners.len() as u32 {
                    kernel.forget_listener(index);
                }
            } else if first {
                // Connections queued before the PID filter was set had their accepts
                // filtered out: they would age for ever as if containerd never took them.
                for index in 0..self.listeners.len() as u32 {
                    kernel.purge_pending(index, Duration::ZERO);
                }
            }
            if let Some(pid) = pid {
                if let Err(e) = kernel.watch_only(pid) {
                    warn!("cannot point the kernel sensors at PID {pid}: {e}");
                }
                kernel.follow_executables(&executable_paths(pid));
            }
        }
        self.blocked.follow(pid);
        if self.exit_by_pidfd {
            if let Some(task) = self.pidfd_task.take() {
                task.abort();
            }
            if let Some(pid) = pid {
                self.pidfd_task = Some(watch_with_pidfd(pid, identity, self.events.clone()));
            }
        }
    }

    /// Samples the accept queue of every listener; the worst one speaks for all.
    /// Whether any sensor watches the accept queue (else [`Sensors::sample_pending`] is
    /// always `None`).
    pub fn watches_queue(&self) -> bool {
        !matches!(self.queue, QueueWatch::Off)
    }

    pub fn sample_pending(&mut self, now: Instant) -> Option<(PendingSnapshot, Source)> {
        let mut worst: Option<PendingSnapshot> = None;
        let mut merge = |s: PendingSnapshot| {
            let w = worst.get_or_insert_with(PendingSnapshot::default);
            w.count += s.count;
            // The listener whose connection waits longest speaks for the accept loop's
            // progress too.
            match s.oldest_age.cmp(&w.oldest_age) {
                std::cmp::Ordering::Greater => w.accepted = s.accepted,
                std::cmp::Ordering::Equal => w.accepted += s.accepted,
                std::cmp::Ordering::Less => {}
            }
            w.oldest_age = w.oldest_age.max(s.oldest_age);
        };
        let source = match &mut self.queue {
            QueueWatch::Off => return None,
            QueueWatch::Ebpf => {
                let kernel = self.kernel.as_mut()?;
                for (index, path) in self.listeners.iter().enumerate() {
                    let index = index as u32;
                    let mut snapshot = kernel.pending(index);
                    // A pending entry whose accept went unseen (a race the program cannot
                    // close) would age forever and look like a stall: before an age can
                    // count, the kernel's own accept queue must agree that someone waits.
                    if snapshot.oldest_age >= Some(STALE_CHECK_AGE)
                        && let Ok(samples) =
                            tokio::task::block_in_place(|| sockdiag::sample_listener(path))
                        && samples.iter().map(|s| s.pending).sum::<u32>() == 0
                    {
                        let dropped = kernel.purge_pending(index, STALE_CHECK_AGE);
                        debug!(dropped, listener = %path.display(), "dropped pending entries the kernel's accept queue does not hold");
                        snapshot = PendingSnapshot::default();
                    }
                    merge(snapshot);
                }
                Source::Ebpf
            }
            QueueWatch::SockDiag(trackers) => {
                for (path, per_inode) in self.listeners.iter().zip(trackers.iter_mut()) {
                    // A netlink dump answers from kernel memory at once; keep it off the
                    // runtime's other tasks all the same.
                    match tokio::task::block_in_place(|| sockdiag::sample_listener(path)) {
                        Ok(samples) => {
                            // A restarted containerd has a new listener: forget the old ones.
                            per_inode.retain(|inode, _| samples.iter().any(|s| s.inode == *inode));
                            for sample in samples {
                                let tracker = per_inode.entry(sample.inode).or_default();
                                let (tracked, oldest_age) =
                                    tracker.update(now, &sample.pending_inodes);
                                // With thousands pending the kernel omits the inode list.
                                let count = tracked.max(sample.pending);
                                let accepted = tracker.accepted();
                                merge(PendingSnapshot {
                                    count,
                                    oldest_age,
                                    accepted,
                                });
                            }
                        }
                        Err(e) => debug!("sock_diag sample of {} failed: {e}", path.display()),
                    }
                }
                Source::SockDiag
            }
        };
        worst.map(|w| (w, source))
    }

    /// Samples containerd's and its shims' threads for D state; says which source timed them.
    pub fn sample_blocked(&mut self, now: Instant) -> (BlockedSample, Source) {
        let sample = tokio::task::block_in_place(|| self.blocked.sample(now));
        (sample, self.blocked.source())
    }

    /// `ebpf` or `procfs`: the source of blocked-thread durations, as `/status` names it.
    pub fn blocked_source(&self) -> &'static str {
        match self.blocked.source() {
            Source::Ebpf => "ebpf",
            _ => "procfs",
        }
    }

    /// The sensors' part of the status document; the programs' statistics are read afresh
    /// when `fresh_costs` says so, else the last ones are repeated.
    pub fn record(&mut self, fresh_costs: bool) -> SensorsRecord {
        let mut record = self.record.clone();
        if let Some(kernel) = &self.kernel {
            if fresh_costs {
                self.costs = kernel.costs();
            }
            for cost in &self.costs {
                let program = ProgramRecord {
                    name: cost.program,
                    run_count: cost.run_count,
                    run_time_ms: cost.run_time.as_secs_f64() * 1e3,
                    avg_run_ns: if cost.run_count == 0 {
                        0.0
                    } else {
                        cost.run_time.as_nanos() as f64 / cost.run_count as f64
                    },
                };
                let sensor = match cost.program {
                    observer_common::PROCESS_EXIT_PROGRAM
                    | observer_common::PROCESS_EXIT_BTF_PROGRAM
                    | observer_common::PROCESS_EXEC_PROGRAM => &mut record.process_exit,
                    observer_common::SIGNAL_PROGRAM | observer_common::OOM_PROGRAM => {
                        &mut record.exit_cause
                    }
                    observer_common::BLOCKED_PROGRAM | observer_common::BLOCKED_BTF_PROGRAM => {
                        &mut record.blocked_threads
                    }
                    _ => &mut record.accept_queue,
                };
                sensor.programs.push(program);
            }
            let (ring_full, pending_full) = kernel.dropped();
            if ring_full + pending_full > 0 {
                record.accept_queue.notes.push(format!(
                    "{ring_full} event(s) dropped on full ring buffers, {pending_full} connection(s) untracked on a full pending map"
                ));
            }
            let blocked_full = kernel.blocked_dropped();
            if blocked_full > 0 {
                record.blocked_threads.notes.push(format!(
                    "{blocked_full} sleep(s) untimed on a full blocked-thread map"
                ));
            }
        }
        record
    }

    pub fn heartbeat(&self) -> HeartbeatRecord {
        match &self.heartbeat {
            Some(h) => HeartbeatRecord {
                interval_ms: self.heartbeat_interval.as_secs_f64() * 1e3,
                sent: h.counts.sent.load(Ordering::Relaxed),
                failed: h.counts.failed.load(Ordering::Relaxed),
            },
            None => HeartbeatRecord::default(),
        }
    }
}

/// The paths a process's binary may be exec'd by: the resolved one and its `argv[0]`.
fn executable_paths(pid: u32) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut paths = Vec::new();
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        paths.push(exe.as_os_str().as_bytes().to_vec());
    }
    if let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline"))
        && let Some(argv0) = cmdline.split(|b| *b == 0).next()
        && argv0.starts_with(b"/")
        && !paths.iter().any(|p| p == argv0)
    {
        paths.push(argv0.to_vec());
    }
    paths
}

fn watch_with_pidfd(
    pid: u32,
    identity: Option<ProcessIdentity>,
    events: mpsc::Sender<KernelEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut watch = match PidExitWatch::open(pid) {
            Ok(w) => w,
            Err(e) => {
                warn!("cannot watch PID {pid} with a pidfd: {e}");
                return;
            }
        };
        // The pidfd names whatever process has the PID now. If that is not the process
        // systemd named (it exited and the PID was reused, or none was read), the pidfd would
        // watch a stranger: the process systemd named is gone, which is its exit. Without a
        // start time to compare (an unreadable /proc), the PID is all there is.
        if identity.is_none_or(|identity| identity.is_current()) {
            if let Err(e) = watch.exited().await {
                warn!("pidfd of PID {pid} failed: {e}");
                return;
            }
        } else {
            debug!(
                pid,
                "PID {pid} no longer names the process systemd reported: it exited"
            );
        }
        let exit = KernelExit {
            pid,
            last_thread: pid,
            comm: String::new(),
            exit_code: None,
            last_signal: None,
            at: Instant::now(),
            delivery: Duration::ZERO,
            source: Source::Pidfd,
        };
        let _ = events.send(KernelEvent::Exit(exit)).await;
    })
}

fn on(hook: &str, path: Option<&'static str>, notes: Vec<String>) -> SensorStatus {
    SensorStatus {
        state: "on",
        hook: hook.to_owned(),
        path,
        reason: None,
        notes,
        programs: Vec::new(),
    }
}

fn fallback(hook: &str, reason: &str) -> SensorStatus {
    SensorStatus {
        state: "fallback",
        hook: hook.to_owned(),
        path: None,
        reason: Some(reason.to_owned()),
        notes: Vec::new(),
        programs: Vec::new(),
    }
}

fn off(hook: &str, reason: &str) -> SensorStatus {
    SensorStatus {
        state: "off",
        hook: hook.to_owned(),
        path: None,
        reason: Some(reason.to_owned()),
        notes: Vec::new(),
        programs: Vec::new(),
    }
}

/// Hands the heap freed after loading (the parsed kernel BTF, some 20 MB) back to the kernel.
/// glibc keeps freed memory for later allocations otherwise, and the agent's steady resident
/// set would carry the load's peak for ever.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only returns free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}
