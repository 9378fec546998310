//! Threads of containerd and its shims in uninterruptible sleep (D state), and where in the
//! kernel they wait (`wchan`, else the top of the thread's kernel `stack`).
//!
//! Two sources, chosen per kernel by `sense::sensors`:
//! - **eBPF** (`tp_btf/sched_switch`, else `sched/sched_switch`; see `observer-ebpf`'s
//!   `blocked.rs`): the program records, for each watched thread that leaves the CPU in D
//!   state, the moment it did, so "blocked since" is exact. A sample reads that map and
//!   checks each entry against the thread's state in `/proc` (a thread that has run again
//!   but not yet left the CPU still has its entry). A thread already asleep when its process
//!   starts to be watched is found in `/proc` once and timed from then.
//! - **`/proc` sampling**, everywhere else: `/proc/<pid>/task/*/stat` at each sample. A
//!   thread seen in D state at consecutive samples counts as blocked since the first of them
//!   (it may have run in between unseen: the duration is a sampled one).
//!
//! The unit cgroup's io and memory pressure (PSI) come with a report as context. The eBPF
//! program's cost is a hash lookup on every context switch of the machine, measured by
//! `cargo xtask bench --switch-cost` (BENCHMARKS.md).
//!
//! Shims are found by their command line (`containerd-shim*` naming containerd's socket),
//! which needs a scan of `/proc`: it is done every [`SHIM_RESCAN`], not at every sample; the
//! kernel program watches the shims found.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::warn;

use crate::{
    judge::{
        detector::Source,
        layer::{BlockedThread, Owner},
    },
    sense::{kernel::BlockedMaps, process::process_state},
};

/// How often the shims are looked for again.
const SHIM_RESCAN: Duration = Duration::from_secs(10);

/// One sample: every thread in D state now, and the pressure context when there is one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockedSample {
    pub threads: Vec<BlockedThread>,
    pub context: String,
}

/// Where the sleeps come from.
enum Timing {
    /// `/proc` sampling, with the first time each thread was seen in D state.
    Procfs { since: HashMap<u32, Instant> },
    /// The kernel program's maps.
    Kernel(Box<BlockedMaps>),
}

/// The blocked-thread sensor: the processes it watches and the source of their sleeps.
pub struct BlockedSampler {
    socket: PathBuf,
    main_pid: Option<u32>,
    shims: Vec<u32>,
    shims_found: Option<Instant>,
    timing: Timing,
}

impl BlockedSampler {
    /// Samples `/proc` for containerd and the shims whose command line names `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            main_pid: None,
            shims: Vec::new(),
            shims_found: None,
            timing: Timing::Procfs {
                since: HashMap::new(),
            },
        }
    }

    /// The same processes, timed by the kernel program whose maps are `maps`.
    pub fn with_kernel(socket: &Path, maps: BlockedMaps) -> Self {
        Self {
            timing: Timing::Kernel(Box::new(maps)),
            ..Self::new(socket)
        }
    }

    /// Which source times the sleeps: [`Source::Ebpf`] or [`Source::Procfs`].
    pub fn source(&self) -> Source {
        match self.timing {
            Timing::Procfs { .. } => Source::Procfs,
            Timing::Kernel(_) => Source::Ebpf,
        }
    }

    pub fn follow(&mut self, pid: Option<u32>) {
        if pid != self.main_pid {
            self.main_pid = pid;
            if let Timing::Procfs { since } = &mut self.timing {
                since.clear();
            }
            self.shims_found = None;
        }
    }

    /// The watched processes, containerd first.
    fn owners(&self) -> impl Iterator<Item = (u32, Owner)> + '_ {
        self.main_pid
            .map(|pid| (pid, Owner::Containerd))
            .into_iter()
            .chain(self.shims.iter().map(|&pid| (pid, Owner::Shim)))
    }

    /// Looks for the shims again when due, and points the kernel program at the processes.
    fn refresh(&mut self, now: Instant) {
        if self
            .shims_found
            .is_some_and(|at| now.saturating_duration_since(at) < SHIM_RESCAN)
        {
            return;
        }
        self.shims = find_shims(&self.socket);
        self.shims_found = Some(now);
        let pids: Vec<u32> = self.owners().map(|(pid, _)| pid).collect();
        if let Timing::Kernel(maps) = &mut self.timing {
            if let Err(e) = maps.watch(&pids) {
                warn!("cannot point the blocked-thread program at containerd and its shims: {e}");
            }
            // Sleeps that began before the program watched: timed from now.
            for &pid in &pids {
                for tid in threads_in_d_state(pid) {
                    maps.seed(pid, tid, now);
                }
            }
        }
    }

    /// Takes one sample at `now`.
    pub fn sample(&mut self, now: Instant) -> BlockedSample {
        self.refresh(now);
        let owners: HashMap<u32, Owner> = self.owners().collect();
        let mut threads = Vec::new();
        match &mut self.timing {
            Timing::Procfs { since } => {
                let mut seen = HashMap::new();
                for (&pid, &owner) in &owners {
                    for tid in threads_in_d_state(pid) {
                        let first = *since.get(&tid).unwrap_or(&now);
                        seen.insert(tid, first);
                        threads.push(blocked_thread(owner, pid, tid, now, first));
                    }
                }
                *since = seen;
            }
            Timing::Kernel(maps) => {
                for sleep in maps.sleeps() {
                    let Some(&owner) = owners.get(&sleep.pid) else {
                        // Its process is no longer watched: no switch will clear the entry.
                        maps.forget(sleep.tid);
                        continue;
                    };
                    match thread_state(sleep.pid, sleep.tid) {
                        Some('D') => threads.push(blocked_thread(
                            owner,
                            sleep.pid,
                            sleep.tid,
                            now,
                            sleep.since,
                        )),
                        // Woken and running: its next switch replaces the entry.
                        Some(_) => {}
                        None => maps.forget(sleep.tid),
                    }
                }
            }
        }
        // containerd's threads first, then each process's by thread ID, as /proc lists them.
        threads.sort_by_key(|t| (t.owner != Owner::Containerd, t.pid, t.tid));
        let context = match (threads.is_empty(), self.main_pid) {
            (false, Some(pid)) => pressure(pid),
            _ => String::new(),
        };
        BlockedSample { threads, context }
    }
}

fn blocked_thread(owner: Owner, pid: u32, tid: u32, now: Instant, since: Instant) -> BlockedThread {
    BlockedThread {
        owner,
        pid,
        tid,
        wchan: wait_site(pid, tid),
        blocked_for: now.saturating_duration_since(since),
    }
}

/// The state letter of thread `tid` of `pid`, or `None` when it is gone.
fn thread_state(pid: u32, tid: u32) -> Option<char> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .ok()
        .and_then(|stat| process_state(&stat))
}

/// The threads of `pid` whose state in `/proc/<pid>/task/<tid>/stat` is `D`.
fn threads_in_d_state(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&tid| thread_state(pid, tid) == Some('D'))
        .collect()
}

/// The kernel function thread `tid` waits in: its `wchan`, else the top frame of its kernel
/// stack (root only, and only with `CONFIG_STACKTRACE`); empty when neither says.
fn wait_site(pid: u32, tid: u32) -> String {
    let task = format!("/proc/{pid}/task/{tid}");
    fs::read_to_string(format!("{task}/wchan"))
        .map(|w| w.trim().to_owned())
        .ok()
        .filter(|w| !w.is_empty() && w != "0")
        .or_else(|| {
            fs::read_to_string(format!("{task}/stack"))
                .ok()
                .and_then(|stack| top_frame(&stack))
        })
        .unwrap_or_default()
}

/// The function of the first frame of a `/proc/<pid>/stack`, e.g. `percpu_rwsem_wait` from
/// `[<0>] percpu_rwsem_wait+0x10f/0x140`.
fn top_frame(stack: &str) -> Option<String> {
    let line = stack.lines().next()?;
    let frame = line.split_once("] ").map_or(line, |(_, f)| f).trim();
    let function = frame.split('+').next()?.trim();
    (!function.is_empty()).then(|| function.to_owned())
}

/// The shims serving the containerd whose socket is `socket`.
fn find_shims(socket: &Path) -> Vec<u32> {
    let address = format!("-address\0{}\0", socket.display());
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
                program
                    .rsplit(|b| *b == b'/')
                    .next()
                    .is_some_and(|name| name.starts_with(b"containerd-shim"))
                    && cmdline
                        .windows(address.len())
                        .any(|w| w == address.as_bytes())
            })
        })
        .collect()
}

/// The io and memory pressure of `pid`'s cgroup (cgroup v2 PSI), or of the whole machine
/// where the cgroup has none, as one line such as `io some avg10=41.00 full avg10=40.12`.
fn pressure(pid: u32) -> String {
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        });
    let dirs: Vec<PathBuf> = cgroup
        .iter()
        .flat_map(|path| {
            let relative = path.trim_start_matches('/');
            [
                Path::new("/sys/fs/cgroup/unified").join(relative),
                Path::new("/sys/fs/cgroup").join(relative),
            ]
        })
        .collect();
    let mut parts = Vec::new();
    for resource in ["io", "memory"] {
        let file = format!("{resource}.pressure");
        let found = dirs
            .iter()
            .find_map(|dir| {
                fs::read_to_string(dir.join(&file))
                    .ok()
                    .map(|t| (t, "unit"))
            })
            .or_else(|| {
                fs::read_to_string(format!("/proc/pressure/{resource}"))
                    .ok()
                    .map(|t| (t, "machine"))
            });
        if let Some((text, scope)) = found {
            parts.push(format!("{scope} {resource} pressure {}", avg10(&text)));
        }
    }
    parts.join(", ")
}

/// `some avg10=X full avg10=Y` from a PSI file.
fn avg10(psi: &str) -> String {
    psi.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let kind = fields.next()?;
            let avg = fields.find_map(|f| f.strip_prefix("avg10="))?;
            Some(format!("{kind} avg10={avg}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_site_is_the_top_frame_of_the_kernel_stack() {
        let stack = "[<0>] percpu_rwsem_wait+0x10f/0x140\n[<0>] vfs_write+0x2a0/0x3c0\n";
        assert_eq!(top_frame(stack).as_deref(), Some("percpu_rwsem_wait"));
        assert_eq!(top_frame(""), None);
    }

    #[test]
    fn pressure_lines_keep_the_ten_second_averages() {
        let psi = "some avg10=41.00 avg60=10.00 avg300=2.00 total=1\nfull avg10=40.12 avg60=9.00 avg300=1.00 total=1\n";
        assert_eq!(avg10(psi), "some avg10=41.00 full avg10=40.12");
    }

    #[test]
    fn a_running_process_has_no_blocked_thread_and_an_absent_one_is_empty() {
        let mut sampler = BlockedSampler::new(Path::new("/nonexistent/containerd.sock"));
        sampler.follow(Some(std::process::id()));
        assert!(sampler.sample(Instant::now()).threads.is_empty());
        sampler.follow(Some(u32::MAX));
        assert_eq!(sampler.sample(Instant::now()), BlockedSample::default());
    }
}
