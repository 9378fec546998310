//! The sandbox's own cgroup.
//!
//! A systemd user manager takes the cgroup it starts in as its root and puts each unit in
//! `<root>/app.slice/<unit>`. Started from the root cgroup, two sandboxes would both use
//! `/app.slice/containerd.service`, and stopping one containerd would kill the other
//! (`KillMode=control-group`). So each sandbox's manager starts in a fresh cgroup named after
//! the sandbox, in every hierarchy systemd tracks processes in: the cgroup2 one and, on a
//! hybrid host, the v1 `name=systemd` one. The same cgroup is what teardown kills: every
//! process the sandbox started, however it daemonised, is still inside.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{SandboxError, process};

/// One cgroup directory per tracking hierarchy, all with the same name.
#[derive(Debug)]
pub(crate) struct SandboxCgroup {
    name: String,
    dirs: Vec<PathBuf>,
}

impl SandboxCgroup {
    /// Creates the cgroup `name` at the root of every tracking hierarchy.
    pub(crate) fn create(name: &str) -> Result<Self, SandboxError> {
        let roots = tracking_roots();
        if roots.is_empty() {
            return Err(SandboxError::Cgroup {
                path: PathBuf::from("/sys/fs/cgroup"),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "no cgroup2 or name=systemd hierarchy is mounted (see /proc/self/mountinfo)",
                ),
            });
        }
        let cgroup = SandboxCgroup {
            name: name.to_string(),
            dirs: roots.iter().map(|root| root.join(name)).collect(),
        };
        for dir in &cgroup.dirs {
            if let Err(source) = fs::create_dir(dir) {
                cgroup.remove();
                return Err(SandboxError::Cgroup {
                    path: dir.clone(),
                    source,
                });
            }
        }
        Ok(cgroup)
    }

    /// The cgroup `name` where it already exists, to clean up after a dead test run.
    pub(crate) fn existing(name: &str) -> Option<Self> {
        let dirs: Vec<PathBuf> = tracking_roots()
            .iter()
            .map(|root| root.join(name))
            .filter(|dir| dir.is_dir())
            .collect();
        (!dirs.is_empty()).then(|| SandboxCgroup {
            name: name.to_string(),
            dirs,
        })
    }

    /// The `cgroup.procs` files a process writes its PID to, to join the cgroup.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// Every process in the cgroup or below it.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            collect_pids(dir, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything inside until it is empty. SIGKILL also ends stopped processes.
    /// Returns the PIDs still there after `timeout`.
    pub(crate) fn kill_all(&self, timeout: Duration) -> Vec<u32> {
        for dir in &self.dirs {
            // cgroup2's atomic kill of the whole subtree (Linux 5.14+); the loop below is the
            // fallback and catches anything forked meanwhile.
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() >= deadline {
                return pids;
            }
            for &pid in &pids {
                process::signal(pid, libc::SIGKILL);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the cgroup and everything systemd created below it, in every hierarchy
    /// (controllers included). Best effort: a cgroup with processes left cannot go.
    pub(crate) fn remove(&self) {
        for root in all_roots() {
            let dir = root.join(&self.name);
            if dir.is_dir() {
                remove_tree(&dir);
            }
        }
    }
}

/// Names of the cgroups at the root of the tracking hierarchies that start with `prefix`.
pub(crate) fn names_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = tracking_roots()
        .iter()
        .flat_map(|root| subdirs(root))
        .filter_map(|dir| Some(dir.file_name()?.to_str()?.to_string()))
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    for child in subdirs(dir) {
        collect_pids(&child, pids);
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Depth-first rmdir. A cgroup whose last process just died can be busy for a moment.
fn remove_tree(dir: &Path) {
    for child in subdirs(dir) {
        remove_tree(&child);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Err(err) = fs::remove_dir(dir) {
        if err.kind() == io::ErrorKind::NotFound || Instant::now() >= deadline {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[derive(PartialEq)]
enum Hierarchy {
    /// cgroup2: systemd tracks processes here on unified and hybrid hosts.
    Unified,
    /// cgroup v1 `name=systemd`: systemd's own tracking hierarchy on hybrid and legacy hosts.
    NamedSystemd,
    /// A cgroup v1 controller (cpu, memory, ...).
    Controller,
}

/// The cgroup mounts of this mount namespace: mount point and hierarchy.
fn mounts() -> Vec<(PathBuf, Hierarchy)> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <opts> [optional...] - <fstype> <source> <super opts>"
            let (left, right) = line.split_once(" - ")?;
            let point = PathBuf::from(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let super_opts = right.nth(1).unwrap_or("");
            let hierarchy = match fstype {
                "cgroup2" => Hierarchy::Unified,
                "cgroup" if super_opts.split(',').any(|opt| opt == "name=systemd") => {
                    Hierarchy::NamedSystemd
                }
                "cgroup" => Hierarchy::Controller,
                _ => return None,
            };
            Some((point, hierarchy))
        })
        .collect()
}

/// The hierarchies systemd tracks processes in, the first mount of each.
fn tracking_roots() -> Vec<PathBuf> {
    let mounts = mounts();
    [Hierarchy::Unified, Hierarchy::NamedSystemd]
        .iter()
        .filter_map(|wanted| {
            mounts
                .iter()
                .find(|(_, hierarchy)| hierarchy == wanted)
                .map(|(point, _)| point.clone())
        })
        .collect()
}

/// The mount point of the cgroup v1 hierarchy of `controller` (`memory`, `freezer`, ...).
pub(crate) fn controller_root(controller: &str) -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let super_opts = right.nth(1).unwrap_or("");
        (fstype == "cgroup" && super_opts.split(',').any(|opt| opt == controller))
            .then(|| PathBuf::from(left.split(' ').nth(4).unwrap_or_default()))
    })
}

/// The cgroup2 directory `pid` runs in (its `0::` line in `/proc/<pid>/cgroup`).
pub(crate) fn unified_cgroup_of(pid: u32) -> Option<PathBuf> {
    let root = mounts()
        .into_iter()
        .find(|(_, hierarchy)| *hierarchy == Hierarchy::Unified)?
        .0;
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cgroups.lines().find_map(|line| line.strip_prefix("0::"))?;
    Some(root.join(path.trim_start_matches('/')))
}

fn all_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = mounts().into_iter().map(|(point, _)| point).collect();
    roots.sort();
    roots.dedup();
    roots
}
