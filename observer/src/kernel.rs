//! Kernel sensors: loads the eBPF programs, keeps their PID filter on containerd's current
//! main process, and turns ring-buffer records into [`KernelExit`]s for the agent.
//!
//! The process-exit program hangs off `sched/sched_process_exit`, a classic tracepoint: its
//! record layout is the kernel's stable interface, and the one field whose presence varies
//! between kernels (`group_dead`) is located from the tracepoint's format file at load time.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, RingBuf},
    programs::TracePoint,
};
use observer_common::{
    EXIT_EVENTS_MAP, ExitEvent, GROUP_DEAD_OFFSET_GLOBAL, NO_GROUP_DEAD, PROCESS_EXIT_PROGRAM,
    WATCHED_PIDS_MAP,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
};
use tracing::{debug, warn};

/// The kernel programs, built from `observer-ebpf` by the build script.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// Where tracefs is usually mounted, newest convention first.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "loading eBPF programs needs root (CAP_BPF and CAP_PERFMON); run as root or pass --no-ebpf"
    )]
    NotRoot,
    #[error(
        "cannot read the tracepoint format {path}: {source}; is tracefs mounted? (mount -t tracefs nodev /sys/kernel/tracing)"
    )]
    Format {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the tracepoint format {path} has no `{field}` field; this kernel is not supported")]
    MissingField { path: PathBuf, field: &'static str },
    #[error("the kernel refused the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the kernel refused program `{program}`: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{name}` is missing or of the wrong type: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("cannot update the PID filter: {0}")]
    Filter(aya::maps::MapError),
    #[error("cannot watch the ring buffer: {0}")]
    Poll(std::io::Error),
}

/// The whole of a watched process exited.
#[derive(Debug, Clone)]
pub struct KernelExit {
    pub pid: u32,
    /// The thread whose exit ended the process, and its command name.
    pub last_thread: u32,
    pub comm: String,
    /// When the kernel ran the exit, on this process's monotonic clock.
    pub at: Instant,
    /// How long the record took from the kernel to the agent.
    pub delivery: Duration,
}

/// One field of a tracepoint record, as its format file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracefs `format` file into its fields.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let decl = line.strip_prefix("field:")?.split(';').next()?;
            // The name is the declaration's last word, without an array suffix.
            let name = decl.split_whitespace().last()?.split('[').next()?;
            let number = |key: &str| -> Option<u32> {
                line.split(';')
                    .find_map(|part| part.trim().strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            };
            Some(Field {
                name: name.to_owned(),
                offset: number("offset:")?,
                size: number("size:")?,
            })
        })
        .collect()
}

fn tracepoint_format(category: &str, name: &str) -> Result<(PathBuf, String), KernelError> {
    let mut last_err = None;
    for root in TRACEFS_ROOTS {
        let path = Path::new(root)
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok((path, text)),
            Err(e) => last_err = Some((path, e)),
        }
    }
    let (path, source) = last_err.expect("at least one tracefs root");
    Err(KernelError::Format { path, source })
}

/// Loaded and attached kernel programs. Dropping this detaches them.
pub struct KernelSensors {
    // Field order matters: the logger must stay alive while the programs are loaded.
    watched: BpfHashMap<MapData, u32, u8>,
    _ebpf: Ebpf,
    /// Whether this kernel's record has `group_dead`; without it the leader's exit stands in.
    pub group_dead_field: bool,
}

impl KernelSensors {
    /// Loads and attaches the programs and starts forwarding exits to `exits`.
    pub fn load(exits: mpsc::Sender<KernelExit>) -> Result<Self, KernelError> {
        if unsafe { libc::geteuid() } != 0 {
            return Err(KernelError::NotRoot);
        }
        raise_memlock_limit();
        let (path, text) = tracepoint_format("sched", "sched_process_exit")?;
        let fields = parse_format(&text);
        if !fields.iter().any(|f| f.name == "pid") {
            return Err(KernelError::MissingField { path, field: "pid" });
        }
        let group_dead = fields
            .iter()
            .find(|f| f.name == "group_dead" && f.size == 1)
            .map(|f| f.offset);
        if group_dead.is_none() {
            warn!(format = %path.display(), "sched_process_exit has no group_dead field; the thread-group leader's exit stands for the process's exit");
        }
        let offset = group_dead.unwrap_or(NO_GROUP_DEAD);

        let mut ebpf = EbpfLoader::new()
            .override_global(GROUP_DEAD_OFFSET_GLOBAL, &offset, true)
            .load(PROGRAMS)?;
        // Messages from the kernel programs join the agent's log stream. The logger must be
        // created before the programs load.
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => warn!("eBPF programs' log messages are unavailable: {e}"),
        }
        let program: &mut TracePoint = ebpf
            .program_mut(PROCESS_EXIT_PROGRAM)
            .ok_or(KernelError::Map {
                name: PROCESS_EXIT_PROGRAM,
                detail: "program not found in the object".into(),
            })?
            .try_into()
            .map_err(|source| KernelError::Program {
                program: PROCESS_EXIT_PROGRAM,
                source,
            })?;
        program.load().map_err(|source| KernelError::Program {
            program: PROCESS_EXIT_PROGRAM,
            source,
        })?;
        program
            .attach("sched", "sched_process_exit")
            .map_err(|source| KernelError::Program {
                program: PROCESS_EXIT_PROGRAM,
                source,
            })?;

        let watched = take_map(&mut ebpf, WATCHED_PIDS_MAP)?;
        let watched = BpfHashMap::try_from(watched).map_err(|e| KernelError::Map {
            name: WATCHED_PIDS_MAP,
            detail: e.to_string(),
        })?;
        let ring = take_map(&mut ebpf, EXIT_EVENTS_MAP)?;
        let ring = RingBuf::try_from(ring).map_err(|e| KernelError::Map {
            name: EXIT_EVENTS_MAP,
            detail: e.to_string(),
        })?;
        // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| KernelError::Poll(std::io::Error::other(e.to_string())))?;
        tokio::spawn(forward_exits(ring, exits));
        Ok(Self {
            watched,
            _ebpf: ebpf,
            group_dead_field: group_dead.is_some(),
        })
    }

    /// Points the kernel-side filter at `pid` alone. The new PID goes in before the old ones
    /// leave, so there is no moment in which neither is watched.
    pub fn watch_only(&mut self, pid: u32) -> Result<(), KernelError> {
        self.watched
            .insert(pid, 1, 0)
            .map_err(KernelError::Filter)?;
        let stale: Vec<u32> = self
            .watched
            .keys()
            .filter_map(Result::ok)
            .filter(|p| *p != pid)
            .collect();
        for p in stale {
            self.watched.remove(&p).map_err(KernelError::Filter)?;
        }
        debug!(pid, "kernel PID filter updated");
        Ok(())
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, KernelError> {
    ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        detail: "not found in the object".into(),
    })
}

async fn forward_exits(mut ring: AsyncFd<RingBuf<MapData>>, exits: mpsc::Sender<KernelExit>) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(e) => {
                warn!("exit ring buffer can no longer be polled: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<ExitEvent>() {
                // SAFETY: the kernel program writes whole `ExitEvent`s into this ring buffer,
                // and the length was checked; the record may be unaligned, hence read_unaligned.
                let event: ExitEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ExitEvent>()) };
                batch.push(event);
            }
        }
        guard.clear_ready();
        for event in batch {
            let (at, delivery) = monotonic_to_instant(event.monotonic_ns);
            let exit = KernelExit {
                pid: event.tgid,
                last_thread: event.tid,
                comm: comm_to_string(&event.comm),
                at,
                delivery,
            };
            if exits.send(exit).await.is_err() {
                return;
            }
        }
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

/// Maps a `bpf_ktime_get_ns()` timestamp (CLOCK_MONOTONIC) onto an `Instant`, and says how
/// long ago it was.
fn monotonic_to_instant(ns: u64) -> (Instant, Duration) {
    let now = Instant::now();
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let ago = Duration::from_nanos(now_ns.saturating_sub(ns));
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
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!("could not lift RLIMIT_MEMLOCK; fine on kernels that account BPF memory by cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_FORMAT_6_18: &str = "name: sched_process_exit
ID: 369
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;

print fmt: \"comm=%s pid=%d prio=%d group_dead=%s\", REC->comm, REC->pid, REC->prio, REC->group_dead ? \"true\" : \"false\"
";

    #[test]
    fn parses_fields_with_offsets_and_sizes() {
        let fields = parse_format(EXIT_FORMAT_6_18);
        let get = |n: &str| fields.iter().find(|f| f.name == n).cloned().unwrap();
        assert_eq!(
            get("comm"),
            Field {
                name: "comm".into(),
                offset: 8,
                size: 16
            }
        );
        assert_eq!(get("pid").offset, 24);
        assert_eq!(get("group_dead").offset, 32);
        assert_eq!(fields.len(), 8);
    }

    #[test]
    fn older_format_has_no_group_dead() {
        let old = EXIT_FORMAT_6_18.replace(
            "\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n",
            "",
        );
        assert!(!parse_format(&old).iter().any(|f| f.name == "group_dead"));
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..10].copy_from_slice(b"containerd");
        assert_eq!(comm_to_string(&comm), "containerd");
    }
}
