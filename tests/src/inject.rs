//! Faults a test can inject into a sandbox's containerd, each undone when its guard drops,
//! also when the test fails or panics:
//!
//! - [`LoopRoot`] / [`FrozenRoot`]: containerd's root on a loop-mounted ext4 filesystem of
//!   the sandbox's own, which `fsfreeze` can stop taking writes (containerd's threads then
//!   block in D state, as on a stalled disk);
//! - [`Container`] / [`StoppedShim`]: a real container (`ctr run --rootfs` over Debian's
//!   static busybox, no image, no registry) whose shim a test can SIGSTOP, a hung shim;
//! - [`StartupHang`]: containerd started while another process holds its metadata
//!   database's lock: it waits for the lock before serving its socket, and every restart
//!   waits the same way, the shape of containerd #13848.
//!
//! Every injector touches only what the sandbox made: its loop file and mount, its
//! containerd's shims, its own metadata file.

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::fs::symlink},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{SandboxError, process};

/// Bounds one mkfs, mount, umount, fsfreeze or ctr call.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";
/// The namespace the kubelet's containers live in, which the `tasks` probe lists.
pub const K8S_NAMESPACE: &str = "k8s.io";

static NEXT_CONTAINER: AtomicU32 = AtomicU32::new(0);

/// Runs a tool to its end, as a harness error when it fails or hangs.
fn run_tool(cmd: &mut Command) -> Result<String, SandboxError> {
    let line = process::describe(cmd);
    let out = process::run_bounded(cmd, TOOL_TIMEOUT)
        .map_err(|err| SandboxError::io(format!("could not run `{line}`"), err))?
        .ok_or_else(|| SandboxError::Timeout {
            what: format!("`{line}` to finish"),
            waited: TOOL_TIMEOUT,
            details: String::new(),
        })?;
    if !out.status.success() {
        return Err(SandboxError::Failed {
            what: format!("`{line}` failed ({})", out.status),
            details: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool(name: &'static str, hint: &'static str) -> Result<PathBuf, SandboxError> {
    process::find_on_path(name).ok_or(SandboxError::MissingTool { tool: name, hint })
}

/// An ext4 filesystem in a file of the sandbox, loop-mounted on containerd's root. Made
/// before the sandbox's manager starts, so the manager's private mount namespace sees it.
#[derive(Debug)]
pub(crate) struct LoopRoot {
    image: PathBuf,
    mount_point: PathBuf,
    mounted: bool,
}

impl LoopRoot {
    /// Makes a sparse `size_mib` image at `image`, formats it and mounts it on `mount_point`.
    pub(crate) fn create(
        image: &Path,
        mount_point: &Path,
        size_mib: u64,
    ) -> Result<LoopRoot, SandboxError> {
        let mkfs = tool("mkfs.ext4", "install it: apt-get install -y e2fsprogs")?;
        let mount = tool("mount", "install it: apt-get install -y mount")?;
        tool("fsfreeze", "install it: apt-get install -y util-linux")?;
        let file = fs::File::create(image).map_err(|err| {
            SandboxError::io(format!("could not create {}", image.display()), err)
        })?;
        file.set_len(size_mib << 20)
            .map_err(|err| SandboxError::io(format!("could not size {}", image.display()), err))?;
        drop(file);
        let mut root = LoopRoot {
            image: image.to_path_buf(),
            mount_point: mount_point.to_path_buf(),
            mounted: false,
        };
        run_tool(Command::new(mkfs).args(["-q", "-F"]).arg(image))?;
        run_tool(
            Command::new(mount)
                .args(["-t", "ext4", "-o", "loop"])
                .arg(image)
                .arg(mount_point),
        )?;
        root.mounted = true;
        Ok(root)
    }

    /// Stops the filesystem taking writes until the guard drops.
    pub(crate) fn freeze(&self) -> Result<FrozenRoot, SandboxError> {
        self.check_ours()?;
        let fsfreeze = tool("fsfreeze", "install it: apt-get install -y util-linux")?;
        run_tool(Command::new(&fsfreeze).arg("-f").arg(&self.mount_point))?;
        Ok(FrozenRoot {
            fsfreeze,
            mount_point: self.mount_point.clone(),
        })
    }

    /// Thaws the filesystem; a no-op unless it is frozen.
    pub(crate) fn thaw(&self) {
        thaw(&self.mount_point);
    }

    /// Thaws and unmounts; the loop device goes with the mount.
    pub(crate) fn remove(&mut self) {
        self.thaw();
        if self.mounted {
            let umount = process::find_on_path("umount").unwrap_or_else(|| "umount".into());
            if let Err(err) = run_tool(Command::new(umount).arg(&self.mount_point)) {
                eprintln!("could not unmount {}: {err}", self.mount_point.display());
            }
            self.mounted = false;
        }
        let _ = fs::remove_file(&self.image);
    }

    /// Refuses to freeze anything but the sandbox's own loop mount.
    fn check_ours(&self) -> Result<(), SandboxError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|err| SandboxError::io("could not read /proc/self/mountinfo", err))?;
        let target = self.mount_point.to_string_lossy();
        let ours = mountinfo.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let source = line
                .split(" - ")
                .nth(1)
                .and_then(|rest| rest.split(' ').nth(1));
            fields.get(4) == Some(&target.as_ref())
                && source.is_some_and(|s| s.starts_with("/dev/loop"))
        });
        if ours && self.mounted {
            Ok(())
        } else {
            Err(SandboxError::InvalidOption(format!(
                "{} is not the sandbox's loop mount; refusing to freeze it",
                self.mount_point.display()
            )))
        }
    }
}

/// Thaws `mount_point`; "not frozen" is fine.
fn thaw(mount_point: &Path) {
    if let Some(fsfreeze) = process::find_on_path("fsfreeze") {
        let _ = process::run_bounded(
            Command::new(fsfreeze).arg("-u").arg(mount_point),
            TOOL_TIMEOUT,
        );
    }
}

/// containerd's root filesystem, frozen: writes there block until this guard drops.
#[derive(Debug)]
#[must_use = "the filesystem thaws when the guard drops"]
pub struct FrozenRoot {
    fsfreeze: PathBuf,
    mount_point: PathBuf,
}

impl FrozenRoot {
    /// Thaws now.
    pub fn thaw(self) {}
}

impl Drop for FrozenRoot {
    fn drop(&mut self) {
        if let Err(err) = run_tool(
            Command::new(&self.fsfreeze)
                .arg("-u")
                .arg(&self.mount_point),
        ) {
            eprintln!("could not thaw {}: {err}", self.mount_point.display());
        }
    }
}

/// A container run by the sandbox's containerd in namespace `k8s.io`: `/bin/sleep 600` over
/// a root filesystem holding only busybox. Dropping it kills and deletes it.
#[derive(Debug)]
pub struct Container {
    id: String,
    ctr: PathBuf,
    socket: PathBuf,
    rootfs: PathBuf,
    /// The container's init process, killed directly if containerd cannot do it.
    init_pid: Option<u32>,
}

impl Container {
    /// Runs a new container through `ctr` against `socket`, its root filesystem in `dir`.
    pub(crate) fn run(socket: &Path, dir: &Path) -> Result<Container, SandboxError> {
        let ctr = tool("ctr", "install it: apt-get install -y containerd")?;
        check_static(Path::new(BUSYBOX))?;
        let n = NEXT_CONTAINER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Container IDs name cgroups outside the sandbox: unique across parallel runs.
        let id = format!("observer-{}-{n}-{nanos:x}", std::process::id());
        let rootfs = dir.join(format!("rootfs-{id}"));
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin)
            .map_err(|err| SandboxError::io(format!("could not create {}", bin.display()), err))?;
        fs::copy(BUSYBOX, bin.join("busybox"))
            .map_err(|err| SandboxError::io(format!("could not copy {BUSYBOX}"), err))?;
        for applet in ["sleep", "sh"] {
            symlink("busybox", bin.join(applet))
                .map_err(|err| SandboxError::io("could not link a busybox applet", err))?;
        }
        let mut container = Container {
            id,
            ctr,
            socket: socket.to_path_buf(),
            rootfs,
            init_pid: None,
        };
        let rootfs = container.rootfs.to_string_lossy().into_owned();
        let id = container.id.clone();
        container.ctr_run(&["run", "-d", "--rootfs", &rootfs, &id, "/bin/sleep", "600"])?;
        container.init_pid = container.task_pid()?;
        Ok(container)
    }

    /// The container's ID, as `Tasks.List` and the observer name it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The PID of the container's shim (`containerd-shim-runc-v2 -namespace k8s.io -id ID`).
    pub fn shim_pid(&self) -> Result<u32, SandboxError> {
        let needle = format!("-id\0{}\0-address\0{}", self.id, self.socket.display());
        let pids = process::pids_with_cmdline_containing(needle.as_bytes());
        match pids.as_slice() {
            [pid] => Ok(*pid),
            other => Err(SandboxError::Failed {
                what: format!(
                    "expected one shim for container {}, found {other:?}",
                    self.id
                ),
                details: String::new(),
            }),
        }
    }

    /// Stops the container's shim (SIGSTOP) until the guard drops.
    pub fn stop_shim(&self) -> Result<StoppedShim, SandboxError> {
        let pid = self.shim_pid()?;
        process::signal(pid, libc::SIGSTOP);
        Ok(StoppedShim { pid })
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", K8S_NAMESPACE])
            .args(args);
        cmd
    }

    fn ctr_run(&self, args: &[&str]) -> Result<String, SandboxError> {
        run_tool(&mut self.ctr_command(args))
    }

    /// The task's init PID, from `ctr task ls`.
    fn task_pid(&self) -> Result<Option<u32>, SandboxError> {
        let out = self.ctr_run(&["task", "ls"])?;
        Ok(out.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(self.id.as_str()))
                .then(|| fields.next()?.parse().ok())
                .flatten()
        }))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // A shim a test left stopped could not kill its container.
        if let Ok(shim) = self.shim_pid() {
            process::signal(shim, libc::SIGCONT);
        }
        let id = self.id.clone();
        let quick = Duration::from_secs(5);
        let _ = process::run_bounded(
            &mut self.ctr_command(&["task", "kill", "--signal", "SIGKILL", &id]),
            quick,
        );
        if let Some(pid) = self.init_pid {
            let gone = process::poll(quick, Duration::from_millis(20), || {
                (!process::pid_exists(pid)).then_some(())
            });
            if gone.is_none() {
                process::signal(pid, libc::SIGKILL);
            }
        }
        let _ = process::run_bounded(&mut self.ctr_command(&["task", "delete", &id]), quick);
        let _ = process::run_bounded(&mut self.ctr_command(&["container", "delete", &id]), quick);
        let _ = fs::remove_dir_all(&self.rootfs);
    }
}

/// A container's shim, stopped by SIGSTOP: containerd's calls to it go unanswered until
/// this guard drops and sends SIGCONT.
#[derive(Debug)]
#[must_use = "the shim continues when the guard drops"]
pub struct StoppedShim {
    pid: u32,
}

impl StoppedShim {
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for StoppedShim {
    fn drop(&mut self) {
        process::signal(self.pid, libc::SIGCONT);
    }
}

/// An exclusive lock on containerd's metadata database (`meta.db`), held by the test
/// process. containerd takes the same lock when its metadata plugin loads, before it serves
/// its socket, and waits for it without a deadline: started meanwhile, it hangs at start.
/// Dropping the guard releases the lock, and containerd carries on starting.
#[derive(Debug)]
#[must_use = "containerd can start once the guard drops"]
pub struct StartupHang {
    file: fs::File,
}

impl StartupHang {
    /// Takes the lock on `meta_db`; containerd must not be running (it would hold it).
    pub(crate) fn lock(meta_db: &Path) -> Result<StartupHang, SandboxError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(meta_db)
            .map_err(|err| {
                SandboxError::io(format!("could not open {}", meta_db.display()), err)
            })?;
        // SAFETY: flock on a descriptor this guard owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(SandboxError::io(
                format!(
                    "could not lock {} (is containerd still running?)",
                    meta_db.display()
                ),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(StartupHang { file })
    }

    /// Releases the lock now.
    pub fn release(self) {}
}

impl Drop for StartupHang {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Refuses a dynamically linked busybox: the container's root holds nothing else.
fn check_static(path: &Path) -> Result<(), SandboxError> {
    let hint = "install Debian's busybox-static (apt-get install -y busybox-static, or `cargo xtask setup`)";
    let bytes = fs::read(path).map_err(|_| SandboxError::MissingTool {
        tool: "busybox (static)",
        hint,
    })?;
    if has_interpreter(&bytes) {
        return Err(SandboxError::Failed {
            what: format!("{} is dynamically linked; {hint}", path.display()),
            details: String::new(),
        });
    }
    Ok(())
}

/// Whether a 64-bit ELF file names a program interpreter (`PT_INTERP`): dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let (Some(phoff), Some(entsize), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(count)).any(|i| {
        let at = phoff as usize + i * usize::from(entsize);
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamically_linked_program_is_told_from_a_static_one() {
        // This test binary is dynamically linked on every supported host.
        let own = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&own));
        assert!(!has_interpreter(b"not an elf file"));
    }
}
