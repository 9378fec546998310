//! Fault injectors for a sandbox's containerd: the failures nodes suffer, made real and
//! reversible. Each injector is a guard: it breaks containerd when made and undoes what it
//! did when dropped, also when the test that made it fails or panics. None touches anything
//! but the sandbox's own processes, cgroups and files.
//!
//! - [`MemoryLimit`]: a v1 memory cgroup made by hand with its limit just above containerd's
//!   usage, so the kernel's OOM killer ends it (this host's user manager cannot delegate the
//!   v1 memory controller, so `MemoryMax=` has no effect);
//! - [`CgroupFreeze`]: the cgroup2 freezer of containerd's unit (`cgroup.freeze`), which
//!   SIGCONT cannot undo, unlike SIGSTOP;
//! - [`FdExhaustion`]: containerd's soft `RLIMIT_NOFILE` lowered to what it has open, and
//!   connections held open until its accept loop fails with EMFILE and its backlog grows;
//! - [`SocketMoved`]: containerd's socket file moved away (or replaced by a dead socket)
//!   while containerd runs on.
//!
//! The SIGKILL, SIGSTOP and wedged-stop faults need no guard: [`crate::signal`] and the
//! sandbox's teardown cover them.

use std::{
    fs, io,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Sandbox, SandboxError, cgroup, process};

const POLL: Duration = Duration::from_millis(10);

/// containerd in a v1 memory cgroup whose limit is a little above its usage: its next
/// allocations make the kernel's memcg OOM killer end it (`oom/mark_victim` fires). The
/// charges of memory containerd already has move along only on kernels that still honour
/// `memory.move_charge_at_immigrate`; on others the usage starts near zero and the limit is
/// `headroom` bytes of new allocations.
///
/// Dropping it moves whatever is still inside back to the root memory cgroup and removes the
/// cgroup. systemd starts a new containerd in its own cgroups, never in this one.
#[derive(Debug)]
pub struct MemoryLimit {
    dir: PathBuf,
    root: PathBuf,
}

impl MemoryLimit {
    /// Moves `pid` (with all its threads) into `<memory>/<sandbox>/oom`, charging its memory
    /// there, and limits the cgroup to its usage plus `headroom` bytes.
    pub fn squeeze(sandbox: &Sandbox, pid: u32, headroom: u64) -> Result<Self, SandboxError> {
        let root = cgroup::controller_root("memory").ok_or_else(|| SandboxError::Cgroup {
            path: PathBuf::from("/sys/fs/cgroup/memory"),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v1 memory hierarchy is mounted (see /proc/self/mountinfo)",
            ),
        })?;
        // Named after the sandbox, so its teardown and the stale-sandbox reaper remove it too.
        let dir = root.join(sandbox.name()).join("oom");
        fs::create_dir_all(&dir).map_err(|source| SandboxError::Cgroup {
            path: dir.clone(),
            source,
        })?;
        let guard = MemoryLimit { dir, root };
        // Charges move with the process where the kernel still can (it is deprecated and
        // refused on 6.18); elsewhere the cgroup starts near empty and counts only what
        // containerd allocates from now on, and the limit is as tight.
        let _ = guard.write("memory.move_charge_at_immigrate", "3");
        guard.write("cgroup.procs", &pid.to_string())?;
        let usage: u64 = guard
            .read("memory.usage_in_bytes")?
            .trim()
            .parse()
            .map_err(|_| SandboxError::Failed {
                what: format!("{} holds no number", guard.dir.display()),
                details: String::new(),
            })?;
        guard.write("memory.limit_in_bytes", &(usage + headroom).to_string())?;
        Ok(guard)
    }

    /// How often the cgroup hit its limit and the OOM killer ran (`oom_kill` of
    /// `memory.oom_control`).
    pub fn oom_kills(&self) -> u64 {
        self.read("memory.oom_control")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), SandboxError> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|source| {
            SandboxError::io(
                format!("could not write {value} to {}", path.display()),
                source,
            )
        })
    }

    fn read(&self, file: &str) -> Result<String, SandboxError> {
        let path = self.dir.join(file);
        fs::read_to_string(&path).map_err(|source| {
            SandboxError::io(format!("could not read {}", path.display()), source)
        })
    }
}

impl Drop for MemoryLimit {
    fn drop(&mut self) {
        // A survivor goes back unlimited; then the empty cgroup can go.
        if let Ok(procs) = fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = process::poll(Duration::from_secs(2), POLL, || {
            fs::remove_dir(&self.dir).is_ok().then_some(())
        });
        if let Some(parent) = self.dir.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

/// The cgroup2 freezer of the cgroup containerd runs in (its unit's): every task in it stops
/// where it is, and neither SIGTERM nor SIGCONT wakes it; SIGKILL still ends it.
///
/// systemd's own `FreezeUnit` fails on this host's hybrid layout, so this writes the cgroup's
/// `cgroup.freeze` directly, and systemd does not know the unit is frozen. Dropping it thaws
/// the cgroup if it still exists.
#[derive(Debug)]
pub struct CgroupFreeze {
    dir: PathBuf,
}

impl CgroupFreeze {
    /// Freezes the cgroup2 cgroup of `pid`, which must be inside `sandbox`, and returns once
    /// the kernel reports it frozen.
    pub fn freeze(sandbox: &Sandbox, pid: u32) -> Result<Self, SandboxError> {
        let dir = cgroup::unified_cgroup_of(pid).ok_or_else(|| SandboxError::Failed {
            what: format!("process {pid} has no cgroup2 cgroup (see /proc/{pid}/cgroup)"),
            details: String::new(),
        })?;
        if !dir.to_string_lossy().contains(&sandbox.name()) {
            return Err(SandboxError::InvalidOption(format!(
                "process {pid} runs in {}, outside sandbox {}: not freezing it",
                dir.display(),
                sandbox.name()
            )));
        }
        let guard = CgroupFreeze { dir };
        let file = guard.dir.join("cgroup.freeze");
        fs::write(&file, "1").map_err(|source| {
            SandboxError::io(format!("could not write 1 to {}", file.display()), source)
        })?;
        process::poll(Duration::from_secs(5), POLL, || {
            guard.frozen().then_some(())
        })
        .ok_or_else(|| SandboxError::Timeout {
            what: format!(
                "{} to report frozen 1",
                guard.dir.join("cgroup.events").display()
            ),
            waited: Duration::from_secs(5),
            details: String::new(),
        })?;
        Ok(guard)
    }

    /// The frozen cgroup.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel reports the cgroup frozen (`frozen 1` in `cgroup.events`).
    pub fn frozen(&self) -> bool {
        fs::read_to_string(self.dir.join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|line| line == "frozen 1"))
    }
}

impl Drop for CgroupFreeze {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("cgroup.freeze"), "0");
    }
}

/// containerd out of file descriptors: its soft `RLIMIT_NOFILE` lowered to what it has open
/// plus `spare`, and connections to its socket held open, so that its accept loop fails with
/// EMFILE and later connections wait in the listener's backlog.
///
/// Only the soft limit is lowered: root here cannot raise a hard limit (no
/// `CAP_SYS_RESOURCE`), but can raise a soft one back up to it. Dropping the guard closes the
/// connections and restores the soft limit, if the same process still runs.
#[derive(Debug)]
pub struct FdExhaustion {
    pid: u32,
    start_time: Option<u64>,
    old: libc::rlimit,
    connections: Vec<UnixStream>,
}

impl FdExhaustion {
    /// Lowers the soft limit of `pid` to its open descriptors plus `spare`, then opens
    /// `spare + waiting` connections to `socket` and holds them. Returns once containerd has
    /// used up its descriptors.
    pub fn exhaust(
        socket: &Path,
        pid: u32,
        spare: u64,
        waiting: usize,
    ) -> Result<Self, SandboxError> {
        let open = open_fds(pid).ok_or_else(|| SandboxError::Failed {
            what: format!("cannot count the open descriptors of {pid} in /proc/{pid}/fd"),
            details: String::new(),
        })?;
        let soft = open + spare;
        let old = prlimit_nofile(pid, None)
            .map_err(|e| SandboxError::io(format!("could not read RLIMIT_NOFILE of {pid}"), e))?;
        let mut guard = FdExhaustion {
            pid,
            start_time: start_time(pid),
            old,
            connections: Vec::new(),
        };
        let lowered = libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        prlimit_nofile(pid, Some(lowered))
            .map_err(|e| SandboxError::io(format!("could not lower RLIMIT_NOFILE of {pid}"), e))?;
        for _ in 0..spare as usize + waiting {
            let stream = UnixStream::connect(socket).map_err(|e| {
                SandboxError::io(format!("could not connect to {}", socket.display()), e)
            })?;
            guard.connections.push(stream);
        }
        process::poll(Duration::from_secs(10), POLL, || {
            (open_fds(pid)? >= lowered.rlim_cur).then_some(())
        })
        .ok_or_else(|| SandboxError::Timeout {
            what: format!(
                "containerd ({pid}) to use up its {} descriptors",
                lowered.rlim_cur
            ),
            waited: Duration::from_secs(10),
            details: format!("open now: {:?}", open_fds(pid)),
        })?;
        Ok(guard)
    }

    /// The soft limit the process had before.
    pub fn old_soft_limit(&self) -> u64 {
        self.old.rlim_cur
    }
}

impl Drop for FdExhaustion {
    fn drop(&mut self) {
        self.connections.clear();
        // The PID may name another process by now: restore only the one we lowered.
        if start_time(self.pid).is_some() && start_time(self.pid) == self.start_time {
            let _ = prlimit_nofile(self.pid, Some(self.old));
        }
    }
}

/// containerd's socket file moved away while containerd runs on: the listener still exists
/// (and is still containerd's), but nothing can reach it by its path. Optionally a dead socket
/// (bound, then closed: connecting to it is refused) takes its place.
///
/// The file is renamed, not unlinked, so dropping the guard can put it back, if the path is
/// still free (a restarted containerd has bound its own socket there by then) and removes
/// what it put in its place.
#[derive(Debug)]
pub struct SocketMoved {
    path: PathBuf,
    aside: PathBuf,
    replaced: bool,
}

impl SocketMoved {
    /// Moves the socket at `path` aside; with `replace`, binds a dead socket in its place.
    pub fn inject(path: &Path, replace: bool) -> Result<Self, SandboxError> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".moved-aside");
        let guard = SocketMoved {
            path: path.to_owned(),
            aside: PathBuf::from(aside),
            replaced: false,
        };
        fs::rename(&guard.path, &guard.aside)
            .map_err(|e| SandboxError::io(format!("could not move {} aside", path.display()), e))?;
        let mut guard = guard;
        if replace {
            // Dropping the listener closes it; its file stays, and connecting is refused.
            UnixListener::bind(&guard.path).map_err(|e| {
                SandboxError::io(format!("could not bind a socket at {}", path.display()), e)
            })?;
            guard.replaced = true;
        }
        Ok(guard)
    }
}

impl Drop for SocketMoved {
    fn drop(&mut self) {
        if self.replaced {
            let _ = fs::remove_file(&self.path);
        }
        if fs::symlink_metadata(&self.path).is_err() {
            let _ = fs::rename(&self.aside, &self.path);
        } else {
            let _ = fs::remove_file(&self.aside);
        }
    }
}

/// How many descriptors `pid` has open.
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with
/// the PID, what names one process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Reads `RLIMIT_NOFILE` of `pid`, and sets it to `new` if given; returns the old value.
fn prlimit_nofile(pid: u32, new: Option<libc::rlimit>) -> io::Result<libc::rlimit> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |limit| limit as *const libc::rlimit);
    // SAFETY: both pointers are valid for the call (or null for "do not set"); prlimit writes
    // only to `old`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            new_ptr,
            &raw mut old,
        )
    };
    if rc == 0 {
        Ok(old)
    } else {
        Err(io::Error::last_os_error())
    }
}
