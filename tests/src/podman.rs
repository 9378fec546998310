//! Podman, as a container runtime of the tests' own: a store, a run root, a temp dir and a
//! `containers.conf` (`CONTAINERS_CONF`) in a private directory, so the machine's own podman
//! configuration, images and containers are never read or touched. Dropping a [`Podman`]
//! removes every pod, container and image it made, unmounts what is left under its
//! directory and deletes it, also after a panic.
//!
//! The configuration is what this machine kind needs (see `shared/TOOLCHAIN.md`): rlimits
//! under root's hard limits (root lacks `CAP_SYS_RESOURCE`, so podman's defaults make runc
//! fail with "error setting rlimit"), cgroupfs (PID 1 is not systemd), events in a file.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{SandboxError, process};

/// `podman kube play` builds the pause image and starts the pod in a few seconds; this bounds
/// a stuck call.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private podman (see the module doc).
#[derive(Debug)]
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// Creates the private directory and its configuration. Needs root and `podman` on PATH.
    ///
    /// `host_pid`: containers join the host's PID namespace by default. podman 4.3's
    /// `kube play` ignores a pod's `hostPID: true` (its containers get a PID namespace of their
    /// own), and this default is how a test gives a pod that asks for it what it asks for.
    pub fn new(host_pid: bool) -> Result<Podman, SandboxError> {
        if process::find_on_path("podman").is_none() {
            return Err(SandboxError::MissingTool {
                tool: "podman",
                hint: "install it: apt-get install -y podman catatonit, or run `cargo xtask setup`",
            });
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "observer-podman-{}-{n}-{nanos:x}",
            std::process::id()
        ));
        fs::create_dir_all(dir.join("tmp"))
            .map_err(|e| SandboxError::io(format!("could not create {}", dir.display()), e))?;
        let podman = Podman { dir };
        let conf = format!(
            "[containers]\n\
             default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             pidns = \"{pidns}\"\n\
             \n\
             [engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             events_logfile_path = \"{dir}/events.log\"\n\
             tmp_dir = \"{dir}/tmp\"\n\
             volume_path = \"{dir}/volumes\"\n",
            dir = podman.dir.display(),
            pidns = if host_pid { "host" } else { "private" },
        );
        let path = podman.dir.join("containers.conf");
        fs::write(&path, conf)
            .map_err(|e| SandboxError::io(format!("could not write {}", path.display()), e))?;
        Ok(podman)
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A `podman` command on the private store and configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        cmd
    }

    /// Runs `podman ARGS` and returns its output, whatever its exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output, SandboxError> {
        let mut cmd = self.command(args);
        let line = process::describe(&cmd);
        process::run_bounded(&mut cmd, PODMAN_TIMEOUT)
            .map_err(|e| SandboxError::io(format!("could not run `{line}`"), e))?
            .ok_or_else(|| SandboxError::Timeout {
                what: format!("`{line}` to finish"),
                waited: PODMAN_TIMEOUT,
                details: String::new(),
            })
    }

    /// Runs `podman ARGS`, fails unless it succeeds, and returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, SandboxError> {
        let out = self.output(args)?;
        if !out.status.success() {
            return Err(SandboxError::Failed {
                what: format!("`podman {}` failed ({})", args.join(" "), out.status),
                details: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads a docker- or OCI-archive and returns the image names it holds.
    pub fn load(&self, archive: &Path) -> Result<Vec<String>, SandboxError> {
        let out = self.run(&["load", "-i", &archive.to_string_lossy()])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                l.strip_prefix("Loaded image: ")
                    .or(l.strip_prefix("Loaded image(s): "))
            })
            .flat_map(|names| names.split(','))
            .map(|name| name.trim().to_owned())
            .collect())
    }

    fn teardown(&mut self) {
        for args in [
            &["pod", "rm", "--all", "--force", "--time", "2"][..],
            &["rm", "--all", "--force", "--time", "2"],
            &["rmi", "--all", "--force"],
        ] {
            if let Ok(out) = self.output(args)
                && !out.status.success()
            {
                eprintln!(
                    "podman {} in {}: {}",
                    args.join(" "),
                    self.dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        // Whatever podman left mounted under the directory (shm, overlay), deepest first.
        let mut inside = self.dir.as_os_str().as_encoded_bytes().to_vec();
        inside.push(b'/');
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.as_bytes().starts_with(&inside))
            .map(str::to_owned)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in mounts {
            let _ = Command::new("umount").args(["-l", &mount]).status();
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.teardown();
    }
}
