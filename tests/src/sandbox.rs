//! A private containerd under a private systemd user manager, reachable on a private bus.
//!
//! Layout of a sandbox directory (`$TMPDIR/observer-sandbox-<pid>-<n>-<nanos>`):
//!
//! ```text
//! runtime/                 XDG_RUNTIME_DIR: systemd/private (systemctl), bus (D-Bus)
//! config/systemd/user/     XDG_CONFIG_HOME: containerd.service and units from write_unit
//! containerd/config.toml   containerd's own root, state and socket; CRI loaded unless
//!                          turned off (no CNI: the CRI probes need none)
//! containerd/root/         containerd's root, optionally an ext4 loop mount of root.img
//! containerd.sock          containerd's gRPC socket (and containerd.sock.ttrpc)
//! <name>.sock              the fake remote snapshotter's socket, when there is one
//! containerd.log           containerd's stdout and stderr
//! manager.log              the user manager's launcher (unshare, mount) errors
//! ```
//!
//! The manager runs in its own mount namespace, where a tmpfs on `/run/systemd` with
//! `/run/systemd/system` in it satisfies systemd's "booted with systemd" check without
//! touching the host. Everything else, including the sockets, is in the sandbox directory,
//! visible from outside. The manager also runs in its own cgroup (see `cgroup.rs`), which
//! keeps parallel sandboxes apart and lets teardown kill every process the sandbox started.
//!
//! The user manager logs to `/dev/console` only, and only when it is a terminal, so its own
//! messages are not captured; errors carry `systemctl --user status` output instead.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    SandboxError,
    cgroup::{self, SandboxCgroup},
    inject::{Container, FrozenRoot, LoopRoot, StartupHang},
    process::{self, TAIL_LINES},
    snapshotter::RemoteSnapshotter,
};

const NAME_PREFIX: &str = "observer-sandbox-";
const UNIT: &str = "containerd.service";
const SYSTEMD_PATHS: [&str; 2] = ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"];
const RESTART_POLICIES: [&str; 7] = [
    "no",
    "always",
    "on-success",
    "on-failure",
    "on-abnormal",
    "on-abort",
    "on-watchdog",
];
/// The longest path a unix socket can bind (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The manager's private socket appears in about 0.1 s; this bounds a broken start.
const MANAGER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd may take to get a main PID and its socket. Bounds only: on a loaded
/// 2-core machine a start that takes 100 ms alone can take seconds.
const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds one systemctl call. `start` waits for the unit, which `TimeoutStartSec` bounds.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Makes every sandbox directory of this process unique, together with the PID.
static NEXT_SANDBOX: AtomicU32 = AtomicU32::new(0);

/// How to run containerd in a [`Sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    restart: String,
    service_extra: String,
    exec_start: Option<String>,
    keep_dir: bool,
    cri: bool,
    root_on_loop_mib: Option<u64>,
    remote_snapshotter: Option<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl SandboxOptions {
    /// containerd as `containerd.service` with `Restart=no`: every restart comes from the test
    /// or from the observer.
    pub fn new() -> Self {
        SandboxOptions {
            restart: "no".to_string(),
            service_extra: String::new(),
            exec_start: None,
            keep_dir: false,
            cri: true,
            root_on_loop_mib: None,
            remote_snapshotter: None,
        }
    }

    /// Disables containerd's CRI plugin, as a misconfigured node would (CRI `Status` is then
    /// `Unimplemented`). It is loaded by default.
    pub fn without_cri(mut self) -> Self {
        self.cri = false;
        self
    }

    /// Puts containerd's root on an ext4 filesystem of `size_mib` MiB in a loop-mounted file
    /// of the sandbox, which [`Sandbox::freeze_root`] can freeze. Needs `mkfs.ext4` and
    /// `fsfreeze`.
    pub fn root_on_loop_fs(mut self, size_mib: u64) -> Self {
        self.root_on_loop_mib = Some(size_mib);
        self
    }

    /// Gives containerd a remote snapshotter `name`: a proxy plugin (`[proxy_plugins.<name>]`,
    /// type `snapshot`) whose backend is a fake the sandbox serves on `<dir>/<name>.sock`
    /// from before containerd starts until teardown ([`Sandbox::remote_snapshotter`]). The
    /// CRI plugin keeps its own snapshotter: only calls that name this one reach it.
    pub fn remote_snapshotter(mut self, name: &str) -> Self {
        self.remote_snapshotter = Some(name.to_string());
        self
    }

    /// The value of `Restart=`: `no`, `always`, `on-failure`, ... Remember systemd's start
    /// rate limit (5 starts in 10 s by default) when restarting quickly.
    pub fn restart(mut self, policy: &str) -> Self {
        self.restart = policy.to_string();
        self
    }

    /// Lines appended to the unit's `[Service]` section, e.g. `RestartSec=100ms`. They come
    /// last, so a setting given here overrides the sandbox's own (`Type=simple`, say).
    pub fn service_extra(mut self, lines: &str) -> Self {
        self.service_extra.push_str(lines.trim());
        self.service_extra.push('\n');
        self
    }

    /// Replaces `ExecStart=`, e.g. with a fake daemon. `{dir}` and `{socket}` in `cmd` become
    /// the sandbox directory and the socket path. The unit stays `Type=notify` unless
    /// [`service_extra`](Self::service_extra) says otherwise, and start does not wait for the
    /// socket, since a fake may not create one.
    pub fn exec_start(mut self, cmd: &str) -> Self {
        self.exec_start = Some(cmd.to_string());
        self
    }

    /// Keeps the sandbox directory after teardown, for reading its logs.
    pub fn keep_dir(mut self, keep: bool) -> Self {
        self.keep_dir = keep;
        self
    }
}

/// The sandbox's bus, stopped by [`Sandbox::stop_bus`]; dropping it starts the bus again.
#[derive(Debug)]
pub struct BusOutage<'a> {
    sandbox: &'a Sandbox,
}

impl BusOutage<'_> {
    /// Starts the bus again and waits until systemd owns its name on it.
    pub fn end(self) -> Result<(), SandboxError> {
        let result = self.restore();
        std::mem::forget(self);
        result
    }

    fn restore(&self) -> Result<(), SandboxError> {
        self.sandbox
            .systemctl(&["start", "dbus.socket", "dbus.service"])?;
        // The manager joins the new bus once dbus.service runs; a `busctl` call through
        // the bus answers once it has.
        let address = self.sandbox.bus_address();
        process::poll(Duration::from_secs(10), POLL_INTERVAL * 5, || {
            Command::new("busctl")
                .args(["--address", &address, "status", "org.freedesktop.systemd1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(std::process::ExitStatus::success)
        })
        .map(drop)
        .ok_or_else(|| SandboxError::Timeout {
            what: "systemd to own org.freedesktop.systemd1 on the restarted bus".into(),
            waited: Duration::from_secs(10),
            details: self.sandbox.diagnostics(),
        })
    }
}

impl Drop for BusOutage<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("could not start the sandbox's bus again: {e}");
        }
    }
}

/// What the unit runs.
enum Daemon {
    /// The real containerd at this path, with the sandbox's config.
    Containerd(PathBuf),
    /// The caller's `ExecStart=` command line.
    Custom(String),
}

/// A running sandbox. Dropping it stops the manager, kills every process it started (a
/// frozen containerd and its shims too), removes its cgroup and, unless kept, its directory.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
    socket: PathBuf,
    unit: String,
    systemctl: PathBuf,
    keep_dir: bool,
    /// The `systemd --user` process (unshare exec'd into it), once started.
    manager: Option<Child>,
    cgroup: Option<SandboxCgroup>,
    loop_root: Option<LoopRoot>,
    /// Declared after everything containerd is stopped with: it must outlive containerd.
    remote_snapshotter: Option<RemoteSnapshotter>,
}

impl Sandbox {
    /// Starts the manager, its bus and containerd, and returns once containerd is active
    /// with a main PID and (for the real containerd) its socket exists. Needs root.
    pub fn start(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        if !RESTART_POLICIES.contains(&opts.restart.as_str()) {
            return Err(SandboxError::InvalidOption(format!(
                "Restart={} is not a systemd restart policy; use one of {}",
                opts.restart,
                RESTART_POLICIES.join(", ")
            )));
        }
        if let Some(name) = &opts.remote_snapshotter
            && (name.is_empty()
                || name.len() > 32
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(SandboxError::InvalidOption(format!(
                "`{name}` is not a snapshotter name for the sandbox; use up to 32 letters, digits, `-` or `_`"
            )));
        }
        let systemd = SYSTEMD_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|path| process::is_executable(path))
            .ok_or(SandboxError::MissingTool {
                tool: "systemd (/lib/systemd/systemd)",
                hint: "install it: apt-get install -y systemd dbus-user-session, or run `cargo xtask setup`",
            })?;
        let unshare = process::find_on_path("unshare").ok_or(SandboxError::MissingTool {
            tool: "unshare",
            hint: "install it: apt-get install -y util-linux",
        })?;
        let systemctl = process::find_on_path("systemctl").ok_or(SandboxError::MissingTool {
            tool: "systemctl",
            hint: "install it: apt-get install -y systemd",
        })?;
        let daemon = match &opts.exec_start {
            Some(cmd) => Daemon::Custom(cmd.clone()),
            None => Daemon::Containerd(process::find_on_path("containerd").ok_or(
                SandboxError::MissingTool {
                    tool: "containerd",
                    hint: "install it: apt-get install -y containerd, or run `cargo xtask setup`",
                },
            )?),
        };

        reap_stale_sandboxes();
        let dir = create_unique_dir()?;
        // From here on, dropping `sandbox` undoes whatever was set up, also on an error.
        let mut sandbox = Sandbox {
            socket: dir.join("containerd.sock"),
            dir,
            unit: UNIT.to_string(),
            systemctl,
            keep_dir: opts.keep_dir,
            manager: None,
            cgroup: None,
            loop_root: None,
            remote_snapshotter: None,
        };
        sandbox.check_socket_paths(opts.remote_snapshotter.as_deref())?;
        sandbox.write_files(&opts, &daemon)?;
        // Before the manager starts: its private mount namespace copies the mounts it sees.
        if let Some(size) = opts.root_on_loop_mib {
            sandbox.loop_root = Some(LoopRoot::create(
                &sandbox.dir.join("root.img"),
                &sandbox.root_dir(),
                size,
            )?);
        }
        let name = sandbox.name();
        sandbox.cgroup = Some(SandboxCgroup::create(&name)?);
        sandbox.start_manager(&systemd, &unshare)?;
        sandbox.start_bus()?;
        if let Some(name) = &opts.remote_snapshotter {
            let socket = sandbox.remote_snapshotter_socket(name);
            sandbox.remote_snapshotter = Some(RemoteSnapshotter::serve(name, &socket)?);
        }
        sandbox.start_containerd(matches!(daemon, Daemon::Containerd(_)))?;
        Ok(sandbox)
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The D-Bus address of the session bus on which the manager owns
    /// `org.freedesktop.systemd1`.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.runtime_dir().join("bus").display())
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The unit that runs containerd.
    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// containerd's root directory (its metadata database, snapshots, content).
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("containerd/root")
    }

    /// Freezes containerd's root filesystem until the guard drops. Needs a sandbox started
    /// with [`SandboxOptions::root_on_loop_fs`].
    pub fn freeze_root(&self) -> Result<FrozenRoot, SandboxError> {
        self.loop_root
            .as_ref()
            .ok_or_else(|| {
                SandboxError::InvalidOption(
                    "containerd's root is not on a loop filesystem: start the sandbox with \
                     SandboxOptions::root_on_loop_fs"
                        .into(),
                )
            })?
            .freeze()
    }

    /// The fake remote snapshotter of a sandbox started with
    /// [`SandboxOptions::remote_snapshotter`].
    pub fn remote_snapshotter(&self) -> Option<&RemoteSnapshotter> {
        self.remote_snapshotter.as_ref()
    }

    fn remote_snapshotter_socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Runs a container (`/bin/sleep 600` over busybox) in namespace `k8s.io`; dropping the
    /// guard kills and deletes it. Needs Debian's busybox-static.
    pub fn run_container(&self) -> Result<Container, SandboxError> {
        Container::run(&self.socket, &self.dir)
    }

    /// Makes containerd hang at start: stops the unit, takes the lock on its metadata
    /// database, and starts the unit again without waiting. containerd then runs but never
    /// serves its socket, and a restart hangs the same way, until the guard drops.
    pub fn hang_startup(&self) -> Result<StartupHang, SandboxError> {
        self.systemctl(&["stop", &self.unit])?;
        let hang = StartupHang::lock(
            &self
                .root_dir()
                .join("io.containerd.metadata.v1.bolt/meta.db"),
        )?;
        self.systemctl(&["start", "--no-block", &self.unit])?;
        Ok(hang)
    }

    /// containerd's stdout and stderr, appended across restarts.
    pub fn containerd_log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// containerd's PID as systemd knows it; `None` while the unit has no main process.
    pub fn main_pid(&self) -> Result<Option<u32>, SandboxError> {
        let out = self.systemctl(&["show", "-p", "MainPID", "--value", &self.unit])?;
        let pid = out
            .trim()
            .parse::<u32>()
            .map_err(|_| SandboxError::Failed {
                what: format!("systemd reported MainPID `{}`, not a number", out.trim()),
                details: String::new(),
            })?;
        Ok((pid != 0).then_some(pid))
    }

    /// The unit's `(ActiveState, SubState)`, e.g. `("active", "running")` or
    /// `("failed", "failed")`.
    pub fn unit_state(&self) -> Result<(String, String), SandboxError> {
        let props = self.show(&["ActiveState", "SubState"])?;
        Ok((prop(&props, "ActiveState"), prop(&props, "SubState")))
    }

    /// Runs `systemctl --user ARGS` against this sandbox's manager and returns its stdout.
    pub fn systemctl(&self, args: &[&str]) -> Result<String, SandboxError> {
        self.systemctl_hinted(args, "")
    }

    /// Waits until the unit is active with a main PID other than `not`, and returns that PID.
    /// Pass the PID from before a kill or restart to wait for its successor.
    pub fn wait_for_pid(&self, not: Option<u32>, timeout: Duration) -> Result<u32, SandboxError> {
        let mut last = String::new();
        let found = process::poll(timeout, POLL_INTERVAL, || {
            let props = match self.show(&["ActiveState", "SubState", "MainPID"]) {
                Ok(props) => props,
                Err(err) => {
                    last = err.to_string();
                    return None;
                }
            };
            last = format!(
                "last seen: ActiveState={} SubState={} MainPID={}",
                prop(&props, "ActiveState"),
                prop(&props, "SubState"),
                prop(&props, "MainPID")
            );
            let pid = prop(&props, "MainPID").parse::<u32>().unwrap_or(0);
            (prop(&props, "ActiveState") == "active" && pid != 0 && Some(pid) != not).then_some(pid)
        });
        found.ok_or_else(|| SandboxError::Timeout {
            what: match not {
                Some(old) => format!(
                    "{} to be active with a main PID other than {old}",
                    self.unit
                ),
                None => format!("{} to be active with a main PID", self.unit),
            },
            waited: timeout,
            details: format!("{last}\n{}", self.diagnostics()),
        })
    }

    /// Stops the sandbox's bus daemon (`dbus.socket` and `dbus.service` of its manager) and
    /// returns a guard that starts it again when dropped: the manager's own connection and
    /// every client's are lost, as in a dbus upgrade on a node.
    pub fn stop_bus(&self) -> Result<BusOutage<'_>, SandboxError> {
        self.systemctl(&["stop", "dbus.socket", "dbus.service"])?;
        Ok(BusOutage { sandbox: self })
    }

    /// Waits until the unit has a main process, in whatever state (a containerd hanging at
    /// start is `activating`), and returns its PID.
    pub fn wait_for_main_pid(&self, timeout: Duration) -> Result<u32, SandboxError> {
        process::poll(timeout, POLL_INTERVAL, || self.main_pid().ok().flatten()).ok_or_else(|| {
            SandboxError::Timeout {
                what: format!("{} to have a main process", self.unit),
                waited: timeout,
                details: self.diagnostics(),
            }
        })
    }

    /// Adds (or replaces) the unit file `name` and reloads the manager.
    pub fn write_unit(&self, name: &str, contents: &str) -> Result<(), SandboxError> {
        if name.is_empty() || name.contains('/') || !name.contains('.') {
            return Err(SandboxError::InvalidOption(format!(
                "`{name}` is not a unit file name; use a name such as `fake.service`"
            )));
        }
        let path = self.unit_dir().join(name);
        fs::write(&path, contents)
            .map_err(|err| SandboxError::io(format!("could not write {}", path.display()), err))?;
        self.systemctl(&["daemon-reload"])?;
        Ok(())
    }

    fn runtime_dir(&self) -> PathBuf {
        self.dir.join("runtime")
    }

    fn unit_dir(&self) -> PathBuf {
        self.dir.join("config/systemd/user")
    }

    fn manager_log(&self) -> PathBuf {
        self.dir.join("manager.log")
    }

    /// The directory's name, which also names the sandbox's cgroup.
    pub(crate) fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn check_socket_paths(&self, remote_snapshotter: Option<&str>) -> Result<(), SandboxError> {
        let longest = [
            self.runtime_dir().join("systemd/private"),
            self.dir.join("containerd.sock.ttrpc"),
        ]
        .into_iter()
        .chain(remote_snapshotter.map(|name| self.remote_snapshotter_socket(name)))
        .map(|path| path.as_os_str().len())
        .max()
        .unwrap_or(0);
        if longest > MAX_SOCKET_PATH {
            return Err(SandboxError::InvalidOption(format!(
                "the sandbox directory {} is too long for unix socket paths ({longest} > \
                 {MAX_SOCKET_PATH} bytes): set TMPDIR to a shorter directory such as /tmp",
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn write_files(&self, opts: &SandboxOptions, daemon: &Daemon) -> Result<(), SandboxError> {
        let runtime = self.runtime_dir();
        for dir in [
            runtime.clone(),
            self.unit_dir(),
            self.dir.join("containerd/root"),
            self.dir.join("containerd/state"),
        ] {
            fs::create_dir_all(&dir).map_err(|err| {
                SandboxError::io(format!("could not create {}", dir.display()), err)
            })?;
        }
        // systemd refuses a runtime directory that others can read.
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).map_err(|err| {
            SandboxError::io(format!("could not chmod {}", runtime.display()), err)
        })?;

        let config = self.dir.join("containerd/config.toml");
        let write = |path: &Path, contents: String| {
            fs::write(path, contents)
                .map_err(|err| SandboxError::io(format!("could not write {}", path.display()), err))
        };
        write(&config, self.containerd_config(opts))?;
        let exec_start = match daemon {
            Daemon::Containerd(containerd) => format!(
                "\"{}\" --config \"{}\"",
                containerd.display(),
                config.display()
            ),
            Daemon::Custom(cmd) => cmd
                .replace("{dir}", &self.dir.to_string_lossy())
                .replace("{socket}", &self.socket.to_string_lossy()),
        };
        write(
            &self.unit_dir().join(&self.unit),
            self.containerd_unit(&exec_start, opts),
        )
    }

    /// A minimal containerd config that shares nothing with a host containerd or another
    /// sandbox. The ttrpc socket defaults to `<grpc address>.ttrpc`, inside the sandbox too.
    /// The CRI plugin's streaming server listens on a port the kernel picks (its default).
    fn containerd_config(&self, opts: &SandboxOptions) -> String {
        let path = |relative: &str| toml_string(&self.dir.join(relative).to_string_lossy());
        let disabled = if opts.cri {
            ""
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
        };
        format!(
            "version = 2\n\
             root = {root}\n\
             state = {state}\n\
             {disabled}\
             \n\
             [grpc]\n  address = {socket}\n\
             \n\
             # No debug socket and no metrics listener: both would be shared addresses.\n\
             [debug]\n  address = \"\"\n\
             \n\
             [metrics]\n  address = \"\"\n\
             \n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = path("containerd/root"),
            state = path("containerd/state"),
            socket = toml_string(&self.socket.to_string_lossy()),
            opt = path("containerd/opt"),
        ) + &opts
            .remote_snapshotter
            .as_ref()
            .map(|name| {
                format!(
                    "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = {}\n",
                    toml_string(&self.remote_snapshotter_socket(name).to_string_lossy())
                )
            })
            .unwrap_or_default()
    }

    /// The unit, shaped like the packaged one (notify, `KillMode=process`, `Delegate=yes`)
    /// so that restarts behave as on a node.
    fn containerd_unit(&self, exec_start: &str, opts: &SandboxOptions) -> String {
        let log = self.containerd_log();
        format!(
            "[Unit]\n\
             Description=containerd in observer sandbox {name}\n\
             \n\
             [Service]\n\
             Type=notify\n\
             ExecStart={exec_start}\n\
             Restart={restart}\n\
             Delegate=yes\n\
             KillMode=process\n\
             TimeoutStartSec=20s\n\
             TimeoutStopSec=5s\n\
             StandardOutput=append:{log}\n\
             StandardError=append:{log}\n\
             {extra}",
            name = self.name(),
            restart = opts.restart,
            log = log.display(),
            extra = opts.service_extra,
        )
    }

    fn start_manager(&mut self, systemd: &Path, unshare: &Path) -> Result<(), SandboxError> {
        // Join the sandbox cgroup first: systemd takes the cgroup it starts in as its root.
        const LAUNCH: &str = r#"set -e
systemd=$1; shift
for procs in "$@"; do echo $$ > "$procs"; done
mkdir -p /run/systemd
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system
# The nodes PID 1 would have made, which a manager running as root mounts over the paths a
# unit's sandboxing hides (ProtectHome=, ProtectKernelTunables=, ProtectKernelLogs=).
mkdir -p /run/systemd/inaccessible
cd /run/systemd/inaccessible
mkdir -m 0 dir; touch reg; chmod 0 reg; mkfifo -m 0 fifo; mknod -m 0 chr c 0 0; mknod -m 0 blk b 0 0
cd /
exec "$systemd" --user"#;
        let log_path = self.manager_log();
        let log = fs::File::create(&log_path).map_err(|err| {
            SandboxError::io(format!("could not create {}", log_path.display()), err)
        })?;
        let log_err = log
            .try_clone()
            .map_err(|err| SandboxError::io("could not duplicate a file handle", err))?;
        let procs = self
            .cgroup
            .as_ref()
            .map(SandboxCgroup::procs_files)
            .unwrap_or_default();
        let mut cmd = Command::new(unshare);
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            LAUNCH,
            "sh",
        ])
        .arg(systemd)
        .args(procs)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("LANG", "C.UTF-8")
        // HOME too, so the manager reads no unit or config of the invoking user.
        .env("HOME", &self.dir)
        .env("XDG_RUNTIME_DIR", self.runtime_dir())
        .env("XDG_CONFIG_HOME", self.dir.join("config"))
        .current_dir(&self.dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C at the terminal must not reach the manager.
        .process_group(0);
        let manager = cmd.spawn().map_err(|err| {
            SandboxError::io(format!("could not run `{}`", process::describe(&cmd)), err)
        })?;
        self.manager = Some(manager);

        let private = self.runtime_dir().join("systemd/private");
        self.wait_for_manager("the user manager's socket", &private)
    }

    /// Waits for `path` to appear while the manager still runs.
    fn wait_for_manager(&mut self, what: &str, path: &Path) -> Result<(), SandboxError> {
        let mut exited = None;
        let found = process::poll(MANAGER_START_TIMEOUT, POLL_INTERVAL, || {
            if path.exists() {
                return Some(());
            }
            if let Some(manager) = self.manager.as_mut()
                && let Ok(Some(status)) = manager.try_wait()
            {
                exited = Some(status);
                return Some(());
            }
            None
        });
        if let Some(status) = exited {
            return Err(SandboxError::Failed {
                what: format!(
                    "the systemd user manager exited ({status}) before {what} appeared at {}",
                    path.display()
                ),
                details: process::log_tail(&self.manager_log(), TAIL_LINES),
            });
        }
        found.ok_or_else(|| SandboxError::Timeout {
            what: format!("{what} at {}", path.display()),
            waited: MANAGER_START_TIMEOUT,
            details: process::log_tail(&self.manager_log(), TAIL_LINES),
        })
    }

    fn start_bus(&mut self) -> Result<(), SandboxError> {
        // Usually already listening through sockets.target; starting it again is a no-op.
        self.systemctl_hinted(
            &["start", "dbus.socket"],
            "; the session bus comes from dbus-user-session: apt-get install -y dbus-user-session",
        )?;
        let bus = self.runtime_dir().join("bus");
        self.wait_for_manager("the session bus socket", &bus)
    }

    fn start_containerd(&mut self, wait_for_socket: bool) -> Result<(), SandboxError> {
        let unit = self.unit.clone();
        if let Err(err) = self.systemctl(&["start", &unit]) {
            return Err(SandboxError::Failed {
                what: format!("could not start {unit}: {err}"),
                details: self.diagnostics(),
            });
        }
        self.wait_for_pid(None, CONTAINERD_START_TIMEOUT)?;
        if wait_for_socket {
            let socket = self.socket.clone();
            process::poll(CONTAINERD_START_TIMEOUT, POLL_INTERVAL, || {
                socket.exists().then_some(())
            })
            .ok_or_else(|| SandboxError::Timeout {
                what: format!("containerd's socket {}", socket.display()),
                waited: CONTAINERD_START_TIMEOUT,
                details: self.diagnostics(),
            })?;
        }
        Ok(())
    }

    fn systemctl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.systemctl);
        // systemctl --user finds the manager at $XDG_RUNTIME_DIR/systemd/private.
        cmd.args(["--user", "--no-pager", "--no-ask-password"])
            .args(args)
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("DBUS_SESSION_BUS_ADDRESS", self.bus_address())
            .env("SYSTEMD_COLORS", "0");
        cmd
    }

    fn systemctl_hinted(&self, args: &[&str], hint: &'static str) -> Result<String, SandboxError> {
        let mut cmd = self.systemctl_command(args);
        let joined = args.join(" ");
        let out = process::run_bounded(&mut cmd, SYSTEMCTL_TIMEOUT)
            .map_err(|err| {
                SandboxError::io(format!("could not run `systemctl --user {joined}`"), err)
            })?
            .ok_or_else(|| SandboxError::Timeout {
                what: format!("`systemctl --user {joined}` to finish"),
                waited: SYSTEMCTL_TIMEOUT,
                details: process::log_tail(&self.manager_log(), TAIL_LINES),
            })?;
        if !out.status.success() {
            return Err(SandboxError::Systemctl {
                args: joined,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                hint,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `systemctl show -p P1 -p P2 unit`, as `Key=Value` lines.
    fn show(&self, props: &[&str]) -> Result<String, SandboxError> {
        let mut args = vec!["show"];
        for prop in props {
            args.extend(["-p", prop]);
        }
        args.push(&self.unit);
        self.systemctl(&args)
    }

    /// What an error about the unit should show: systemd's view of it, and the logs.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        let status = self
            .systemctl_command(&["status", &self.unit])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
            .unwrap_or_else(|err| format!("could not run systemctl status: {err}"));
        let _ = writeln!(
            out,
            "--- systemctl --user status {} ---\n{status}",
            self.unit
        );
        let _ = writeln!(
            out,
            "{}",
            process::log_tail(&self.containerd_log(), TAIL_LINES)
        );
        let _ = write!(
            out,
            "{}",
            process::log_tail(&self.manager_log(), TAIL_LINES)
        );
        out
    }

    fn teardown(&mut self) {
        if std::thread::panicking() && self.manager.is_some() {
            eprintln!(
                "sandbox {} at teardown after a panic:\n{}",
                self.dir.display(),
                self.diagnostics()
            );
        }
        // A frozen root would block containerd's stop (its threads in D state): thaw first.
        if let Some(root) = &self.loop_root {
            root.thaw();
        }
        let mut exit = self.systemctl_command(&["exit"]);
        if let Some(manager) = self.manager.as_mut()
            && matches!(manager.try_wait(), Ok(None))
        {
            // A clean exit first: systemd stops containerd (SIGCONT after SIGTERM, so a
            // frozen one stops too). Everything after this is the safety net.
            let _ = process::run_bounded(&mut exit, Duration::from_secs(3));
            let _ = process::wait_bounded(manager, Duration::from_secs(5));
        }
        if let Some(cgroup) = &self.cgroup {
            let left = cgroup.kill_all(Duration::from_secs(5));
            if !left.is_empty() {
                eprintln!(
                    "sandbox {}: processes {left:?} survived SIGKILL in its cgroup",
                    self.dir.display()
                );
            }
        }
        if let Some(mut manager) = self.manager.take() {
            let _ = manager.kill();
            let _ = manager.wait();
        }
        // Anything that left the cgroup but still names the sandbox (e.g. an observer
        // pointed at it) must not outlive it either.
        let mut inside = self.dir.as_os_str().as_encoded_bytes().to_vec();
        inside.push(b'/');
        for pid in process::pids_with_cmdline_containing(&inside) {
            process::signal(pid, libc::SIGKILL);
        }
        // containerd is gone: its remote snapshotter may go too, a stalled call with it.
        drop(self.remote_snapshotter.take());
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
        if let Some(mut root) = self.loop_root.take() {
            root.remove();
        }
        if self.keep_dir {
            // Uncaptured by the test harness, like require's SKIPPED line.
            let _ = writeln!(std::io::stderr(), "sandbox kept: {}", self.dir.display());
        } else if let Err(err) = fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove sandbox {}: {err}", self.dir.display());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The value of `key` in `systemctl show` output, empty when absent.
fn prop(props: &str, key: &str) -> String {
    props
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_default()
        .to_string()
}

/// A TOML basic string.
fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

fn create_unique_dir() -> Result<PathBuf, SandboxError> {
    let base = std::env::temp_dir();
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let n = NEXT_SANDBOX.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{NAME_PREFIX}{}-{n}-{nanos:x}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => {
                return Err(SandboxError::io(
                    format!("could not create the sandbox directory {}", dir.display()),
                    err,
                ));
            }
        }
    }
}

/// Kills and removes sandboxes whose test process died without tearing them down (killed by
/// a timeout, say). Only those whose directory is in our temp dir and whose owner PID (the
/// second part of the name) no longer exists, so a live run is never touched.
fn reap_stale_sandboxes() {
    let base = std::env::temp_dir();
    for name in cgroup::names_with_prefix(NAME_PREFIX) {
        let owner = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let dir = base.join(&name);
        let Some(owner) = owner else { continue };
        if process::pid_exists(owner) || !dir.is_dir() {
            continue;
        }
        if let Some(cgroup) = SandboxCgroup::existing(&name) {
            cgroup.kill_all(Duration::from_secs(2));
            cgroup.remove();
        }
        let _ = fs::remove_dir_all(&dir);
        eprintln!(
            "removed stale sandbox {} (its process {owner} is gone)",
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prop_reads_show_output() {
        let props = "ActiveState=active\nSubState=running\nMainPID=42\n";
        assert_eq!(prop(props, "SubState"), "running");
        assert_eq!(prop(props, "MainPID"), "42");
        assert_eq!(prop(props, "Main"), "");
    }

    #[test]
    fn toml_string_escapes() {
        assert_eq!(toml_string(r#"/a "b"\c"#), r#""/a \"b\"\\c""#);
    }

    #[test]
    fn a_snapshotter_name_that_cannot_name_a_plugin_is_refused_before_anything_starts() {
        let err =
            Sandbox::start(SandboxOptions::new().remote_snapshotter("my snap\"shot")).unwrap_err();
        assert!(err.to_string().contains("letters, digits"), "{err}");
    }

    #[test]
    fn unknown_restart_policy_is_refused_before_anything_starts() {
        let err = Sandbox::start(SandboxOptions::new().restart("sometimes")).unwrap_err();
        assert!(err.to_string().contains("on-failure"), "{err}");
    }
}
