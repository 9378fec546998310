//! Threads of containerd and its shims in uninterruptible sleep (D state), and where in the
//! kernel they wait, sampled from `/proc/<pid>/task/*/stat` and `wchan`.
//!
//! A thread seen in D state at consecutive samples counts as blocked since the first of
//! them (it may have run in between unseen: the duration is a sampled one). The unit
//! cgroup's io and memory pressure (PSI) come with a report as context. This sampler works
//! on every kernel; an eBPF `sched_switch` program could time each sleep exactly, at a cost
//! paid on every context switch of the machine, and is not used.
//!
//! Shims are found by their command line (`containerd-shim*` naming containerd's socket),
//! which needs a scan of `/proc`: it is done every [`SHIM_RESCAN`], not at every sample.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    judge::layer::{BlockedThread, Owner},
    sense::process::process_state,
};

/// How often the shims are looked for again.
const SHIM_RESCAN: Duration = Duration::from_secs(10);

/// One sample: every thread in D state now, and the pressure context when there is one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockedSample {
    pub threads: Vec<BlockedThread>,
    pub context: String,
}

/// The sampler, with the first time each thread was seen in D state.
#[derive(Debug)]
pub struct BlockedSampler {
    socket: PathBuf,
    main_pid: Option<u32>,
    shims: Vec<u32>,
    shims_found: Option<Instant>,
    since: HashMap<u32, Instant>,
}

impl BlockedSampler {
    /// Watches containerd and the shims whose command line names `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            main_pid: None,
            shims: Vec::new(),
            shims_found: None,
            since: HashMap::new(),
        }
    }

    pub fn follow(&mut self, pid: Option<u32>) {
        if pid != self.main_pid {
            self.main_pid = pid;
            self.since.clear();
            self.shims_found = None;
        }
    }

    /// Takes one sample at `now`.
    pub fn sample(&mut self, now: Instant) -> BlockedSample {
        if self
            .shims_found
            .is_none_or(|at| now.saturating_duration_since(at) >= SHIM_RESCAN)
        {
            self.shims = find_shims(&self.socket);
            self.shims_found = Some(now);
        }
        let mut seen = HashMap::new();
        let mut threads = Vec::new();
        let owners = self
            .main_pid
            .map(|pid| (pid, Owner::Containerd))
            .into_iter()
            .chain(self.shims.iter().map(|&pid| (pid, Owner::Shim)));
        for (pid, owner) in owners {
            for tid in threads_in_d_state(pid) {
                let since = *self.since.get(&tid).unwrap_or(&now);
                seen.insert(tid, since);
                threads.push(BlockedThread {
                    owner,
                    pid,
                    tid,
                    wchan: wchan(pid, tid),
                    blocked_for: now.saturating_duration_since(since),
                });
            }
        }
        self.since = seen;
        let context = match (threads.is_empty(), self.main_pid) {
            (false, Some(pid)) => pressure(pid),
            _ => String::new(),
        };
        BlockedSample { threads, context }
    }
}

/// The threads of `pid` whose state in `/proc/<pid>/task/<tid>/stat` is `D`.
fn threads_in_d_state(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|tid| {
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
                .is_ok_and(|stat| process_state(&stat) == Some('D'))
        })
        .collect()
}

fn wchan(pid: u32, tid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan"))
        .map(|w| w.trim().to_owned())
        .ok()
        .filter(|w| w != "0")
        .unwrap_or_default()
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
