//! The agent's settings: command-line flags, `OBSERVER_*` environment variables and an
//! optional TOML file, merged in that order of precedence over the built-in defaults.
//!
//! Flags and environment variables are read by clap (a flag wins over its variable); the file
//! fills in whatever neither gave. Errors name the file, the line and what to fix.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{Args, Parser, Subcommand, builder::BoolishValueParser};
use serde::Deserialize;
use toml::Spanned;

use crate::judge::layer::Layer;

/// Default path of containerd's gRPC socket.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// Default systemd unit running containerd.
pub const DEFAULT_UNIT: &str = "containerd.service";
/// Default pause switch: while this file exists the agent never acts.
pub const DEFAULT_PAUSE_FILE: &str = "/run/containerd-observer/pause";
/// Default address of the status endpoint.
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:9847";

#[derive(Debug, Parser)]
#[command(
    name = "observer",
    version,
    about = "Watches containerd from the kernel and through its API, and restarts it through systemd when it crashes or hangs",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the state of a running observer.
    Status(StatusArgs),
    /// Check what the agent would use on this node, without starting it.
    ///
    /// Loads the kernel programs, tries the fallbacks, probes containerd and connects to
    /// systemd, with the agent's own settings, and says what is missing and the fix. Exits 1
    /// when something the agent needs is missing, 2 for a bad configuration.
    Doctor(Box<DoctorArgs>),
}

/// `observer doctor`: the agent's own flags, so it checks what the agent would use.
#[derive(Debug, Args, Default)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Default)]
pub struct StatusArgs {
    /// The agent's TOML configuration file, to find its status endpoint there.
    #[arg(long, env = "OBSERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the running observer's status endpoint [default: 127.0.0.1:9847]
    #[arg(long, env = "OBSERVER_STATUS_LISTEN", value_name = "ADDR", value_parser = parse_listen_addr)]
    pub status_listen: Option<SocketAddr>,
    /// Unix socket of the running observer's status endpoint; preferred over --status-listen.
    #[arg(long, env = "OBSERVER_STATUS_SOCKET", value_name = "PATH")]
    pub status_socket: Option<PathBuf>,
    /// Print the raw JSON status document.
    #[arg(long)]
    pub json: bool,
}

/// Where `observer status` finds the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for StatusTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusTarget::Tcp(addr) => write!(f, "http://{addr}"),
            StatusTarget::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl StatusArgs {
    /// The endpoint to ask: a socket or address given by flag or environment first, then
    /// the file's, then the default address. A unix socket wins over an address of the same
    /// rank, since it never leaves the machine.
    pub fn target(&self) -> Result<StatusTarget, ConfigError> {
        if let Some(path) = &self.status_socket {
            return Ok(StatusTarget::Unix(path.clone()));
        }
        if let Some(addr) = self.status_listen {
            return Ok(StatusTarget::Tcp(addr));
        }
        let file = match &self.config {
            Some(path) => load_file(path)?.0,
            None => FileConfig::default(),
        };
        if let Some(path) = file.status_socket {
            return Ok(StatusTarget::Unix(path.into_inner()));
        }
        Ok(StatusTarget::Tcp(match file.status_listen {
            Some(addr) => addr.into_inner().0,
            None => default_status_listen(),
        }))
    }
}

/// Flags of the agent itself. Every value is optional here so that the file can fill in
/// what the flags and the environment left out.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// TOML configuration file; flags and OBSERVER_* variables override it.
    #[arg(long, env = "OBSERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// containerd's gRPC socket [default: /run/containerd/containerd.sock]
    #[arg(long, env = "OBSERVER_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// systemd unit that runs containerd [default: containerd.service]
    #[arg(long, env = "OBSERVER_UNIT", value_name = "NAME")]
    pub unit: Option<String>,
    /// D-Bus to reach systemd on: system, session, or an address such as unix:path=/run/x/bus [default: system]
    #[arg(long, env = "OBSERVER_BUS", value_name = "system|session|ADDRESS")]
    pub bus: Option<Bus>,
    /// Address of the HTTP endpoint (/status, /livez, /readyz, /metrics) [default: 127.0.0.1:9847]
    #[arg(long, env = "OBSERVER_STATUS_LISTEN", value_name = "ADDR", value_parser = parse_listen_addr)]
    pub status_listen: Option<SocketAddr>,
    /// Also serve the HTTP endpoint on this unix socket (a stale socket file is replaced) [default: none]
    #[arg(long, env = "OBSERVER_STATUS_SOCKET", value_name = "PATH")]
    pub status_socket: Option<PathBuf>,
    /// Time between two Version() probes, e.g. 2s or 500ms [default: 2s]
    #[arg(long, env = "OBSERVER_PROBE_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
    pub probe_interval: Option<Duration>,
    /// Deadline of one Version() probe [default: 1s]
    #[arg(long, env = "OBSERVER_PROBE_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub probe_timeout: Option<Duration>,
    /// Listening socket(s) whose accept queue to watch; repeat for several [default: the --socket path]
    #[arg(
        long = "listener",
        env = "OBSERVER_LISTENERS",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub listeners: Vec<PathBuf>,
    /// Time between two heartbeat connections to each listener [default: 250ms]
    #[arg(long, env = "OBSERVER_HEARTBEAT_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Age of the oldest pending connection from which containerd's accept loop looks stalled [default: 1s]
    #[arg(long, env = "OBSERVER_STALL_THRESHOLD", value_name = "DUR", value_parser = parse_duration)]
    pub stall_threshold: Option<Duration>,
    /// Run on probes alone, with no kernel sensor at all (the polling-only baseline).
    #[arg(long, env = "OBSERVER_NO_EBPF", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub no_ebpf: Option<bool>,
    /// Use the sensors that need no eBPF (pidfd, sock_diag) even where eBPF would load; the
    /// agent falls back to them by itself when eBPF is unavailable.
    #[arg(long, env = "OBSERVER_FALLBACK_SENSORS", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub fallback_sensors: Option<bool>,
    /// Never report to the Kubernetes API (node condition, events), even in a cluster.
    #[arg(long, env = "OBSERVER_NO_KUBERNETES", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub no_kubernetes: Option<bool>,
    /// Decide and record, but never restart anything.
    #[arg(long, env = "OBSERVER_DRY_RUN", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub dry_run: Option<bool>,
    /// While this file exists the agent judges and records but never acts (maintenance) [default: /run/containerd-observer/pause]
    #[arg(long, env = "OBSERVER_PAUSE_FILE", value_name = "PATH")]
    pub pause_file: Option<PathBuf>,
    /// How long a hung stop may take before systemd is asked to SIGKILL the main process [default: 10s]
    #[arg(long, env = "OBSERVER_KILL_GRACE", value_name = "DUR", value_parser = parse_duration)]
    pub kill_grace: Option<Duration>,
    /// How long to wait for containerd's goroutine dump before restarting a hung containerd [default: 500ms]
    #[arg(long, env = "OBSERVER_STACK_DUMP_WAIT", value_name = "DUR", value_parser = parse_duration)]
    pub stack_dump_wait: Option<Duration>,
    /// Consecutive failed probes that make a hang when there is no kernel evidence [default: 3]
    #[arg(long, env = "OBSERVER_FAILURES_TO_HANG", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub failures_to_hang: Option<u32>,
    /// Wait after a restart before another may happen; doubles with each restart, up to 5 min [default: 10s]
    #[arg(long, env = "OBSERVER_RESTART_BACKOFF", value_name = "DUR", value_parser = parse_duration)]
    pub restart_backoff: Option<Duration>,
    /// Restarts within 30 min after which the observer gives up until containerd is healthy [default: 5]
    #[arg(long, env = "OBSERVER_MAX_RESTARTS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_restarts: Option<u32>,
    /// Do not ask a hung containerd for its goroutine dump (SIGUSR1) before restarting it.
    #[arg(long, env = "OBSERVER_NO_STACK_DUMP", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub no_stack_dump: Option<bool>,
    /// Probe layers to run, comma-separated, from version, cri, sandboxes, metadata_read,
    /// metadata_write, snapshots, tasks (version is always one) [default: every layer the running containerd supports]
    #[arg(long, env = "OBSERVER_PROBES", value_name = "LAYERS", value_delimiter = ',', value_parser = parse_layer)]
    pub probes: Vec<Layer>,
    /// Base period of the deeper probe layers: reads run every period, writes, snapshots and tasks every two [default: 5s]
    #[arg(long, env = "OBSERVER_LADDER_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
    pub ladder_interval: Option<Duration>,
    /// How long containerd's threads may stay in D state before it is a storage stall [default: 2s]
    #[arg(long, env = "OBSERVER_BLOCKED_THRESHOLD", value_name = "DUR", value_parser = parse_duration)]
    pub blocked_threshold: Option<Duration>,
    /// The snapshotter whose lock the snapshots layer takes: the one the CRI plugin uses [default: overlayfs]
    #[arg(long, env = "OBSERVER_SNAPSHOTTER", value_name = "NAME")]
    pub snapshotter: Option<String>,
    /// Kill a shim that does not answer containerd (containerd itself is never restarted for it).
    #[arg(long, env = "OBSERVER_KILL_HUNG_SHIMS", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = BoolishValueParser::new())]
    pub kill_hung_shims: Option<bool>,
    /// Log line format: text (coloured on a terminal) or json (one object per line) [default: text]
    #[arg(long, env = "OBSERVER_LOG_FORMAT", value_name = "text|json")]
    pub log_format: Option<LogFormat>,
    /// Log filter: a level or RUST_LOG-style directives; RUST_LOG applies when this is not given [default: info]
    #[arg(long, env = "OBSERVER_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
}

/// Which D-Bus carries systemd's API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    /// The bus in `DBUS_SESSION_BUS_ADDRESS`.
    Session,
    /// An explicit D-Bus address, such as `unix:path=/run/x/bus`.
    Address(String),
}

impl FromStr for Bus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "system" => Ok(Bus::System),
            "session" => Ok(Bus::Session),
            a if a.contains(':') && a.contains('=') => Ok(Bus::Address(a.to_owned())),
            other => Err(format!(
                "`{other}` is not a bus: use `system`, `session`, or a D-Bus address such as `unix:path=/run/dbus/system_bus_socket`"
            )),
        }
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::System => f.write_str("system"),
            Bus::Session => f.write_str("session"),
            Bus::Address(a) => f.write_str(a),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); write it like 2s, 500ms or 1m"))?;
    if d.is_zero() {
        return Err(format!(
            "`{s}` is zero; give a positive duration such as 1s"
        ));
    }
    Ok(d)
}

fn parse_layer(s: &str) -> Result<Layer, String> {
    s.trim().parse()
}

/// A probe layer's name, as the file spells it.
#[derive(Debug, Clone, Copy)]
struct LayerName(Layer);

impl FromStr for LayerName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_layer(s).map(LayerName)
    }
}

/// The file's list of probe layers.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "Vec<LayerName>")]
struct LayerList(Vec<Layer>);

impl From<Vec<LayerName>> for LayerList {
    fn from(names: Vec<LayerName>) -> Self {
        LayerList(names.into_iter().map(|n| n.0).collect())
    }
}

impl From<LayerList> for Vec<Layer> {
    fn from(list: LayerList) -> Self {
        list.0
    }
}

fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<ListenAddr>().map(|a| a.0)
}

fn default_status_listen() -> SocketAddr {
    DEFAULT_STATUS_LISTEN
        .parse()
        .expect("the default address parses")
}

/// A duration written like `2s` or `500ms`; zero is refused.
#[derive(Debug, Clone, Copy)]
struct HumanDuration(Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Self {
        d.0
    }
}

/// An address to listen on, with a message that shows how to write one.
#[derive(Debug, Clone, Copy)]
struct ListenAddr(SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ListenAddr).map_err(|_| {
            format!("`{s}` is not an address and port; write it like 127.0.0.1:9847 or [::1]:9847")
        })
    }
}

impl From<ListenAddr> for SocketAddr {
    fn from(a: ListenAddr) -> Self {
        a.0
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "`{other}` is not a log format: use `text` or `json`"
            )),
        }
    }
}

/// A log filter in `RUST_LOG` syntax: a level (`info`), or directives such as
/// `info,observer=debug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(pub String);

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hint = "write a level (trace, debug, info, warn, error, off) or directives such as info,observer=debug";
        // A bare word would parse as a target name and silently log nothing useful.
        let is_directive = s.contains('=') || s.contains(',') || s.contains("::");
        if !is_directive && !LEVELS.contains(&s.to_ascii_lowercase().as_str()) {
            return Err(format!("`{s}` is not a log level; {hint}"));
        }
        tracing_subscriber::EnvFilter::try_new(s)
            .map(|_| LogLevel(s.to_owned()))
            .map_err(|e| format!("`{s}` is not a log filter ({e}); {hint}"))
    }
}

impl std::fmt::Display for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Values the file spells as strings are parsed with the same rules as their flags, and a
/// bad one fails inside toml, which then names its line and column.
macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

deserialize_from_str!(
    HumanDuration,
    ListenAddr,
    Bus,
    LogFormat,
    LogLevel,
    LayerName
);

/// The optional configuration file. Unknown keys are errors, so a typo never goes unnoticed;
/// every value keeps its position so that errors can name its line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    socket: Option<Spanned<PathBuf>>,
    unit: Option<Spanned<String>>,
    bus: Option<Spanned<Bus>>,
    status_listen: Option<Spanned<ListenAddr>>,
    status_socket: Option<Spanned<PathBuf>>,
    probe_interval: Option<Spanned<HumanDuration>>,
    probe_timeout: Option<Spanned<HumanDuration>>,
    listeners: Option<Spanned<Vec<PathBuf>>>,
    heartbeat_interval: Option<Spanned<HumanDuration>>,
    stall_threshold: Option<Spanned<HumanDuration>>,
    no_ebpf: Option<Spanned<bool>>,
    fallback_sensors: Option<Spanned<bool>>,
    no_kubernetes: Option<Spanned<bool>>,
    pause_file: Option<Spanned<PathBuf>>,
    kill_grace: Option<Spanned<HumanDuration>>,
    stack_dump_wait: Option<Spanned<HumanDuration>>,
    failures_to_hang: Option<Spanned<u32>>,
    restart_backoff: Option<Spanned<HumanDuration>>,
    max_restarts: Option<Spanned<u32>>,
    no_stack_dump: Option<Spanned<bool>>,
    dry_run: Option<Spanned<bool>>,
    log_format: Option<Spanned<LogFormat>>,
    log_level: Option<Spanned<LogLevel>>,
    probes: Option<Spanned<LayerList>>,
    ladder_interval: Option<Spanned<HumanDuration>>,
    blocked_threshold: Option<Spanned<HumanDuration>>,
    snapshotter: Option<Spanned<String>>,
    kill_hung_shims: Option<Spanned<bool>>,
}

/// Settings the agent runs with, after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub unit: String,
    pub bus: Bus,
    pub status_listen: SocketAddr,
    /// A unix socket that serves the same HTTP routes as `status_listen`.
    pub status_socket: Option<PathBuf>,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Listening sockets whose accept queue is watched; never empty.
    pub listeners: Vec<PathBuf>,
    pub heartbeat_interval: Duration,
    pub stall_threshold: Duration,
    pub no_ebpf: bool,
    pub fallback_sensors: bool,
    pub no_kubernetes: bool,
    pub dry_run: bool,
    pub pause_file: PathBuf,
    pub kill_grace: Duration,
    /// How long the goroutine dump of a hung containerd is waited for before its restart.
    pub stack_dump_wait: Duration,
    pub failures_to_hang: u32,
    pub restart_backoff: Duration,
    pub max_restarts: u32,
    pub dump_stacks: bool,
    pub log_format: LogFormat,
    pub log_level: LogLevel,
    /// The probe layers asked for; `None`: every layer the running containerd supports.
    pub probes: Option<Vec<Layer>>,
    pub ladder_interval: Duration,
    pub blocked_threshold: Duration,
    pub snapshotter: String,
    pub kill_hung_shims: bool,
}

/// Where a setting's value came from, so that an error can say where to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The flag or its `OBSERVER_*` variable (clap lets the flag win).
    Command {
        key: &'static str,
    },
    /// A key of the configuration file.
    File {
        path: PathBuf,
        key: &'static str,
        line: usize,
    },
    /// `RUST_LOG`, which stands in for `--log-level`.
    RustLog,
    Default {
        key: &'static str,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The one flag whose name differs from its key: it is repeated, once per socket.
            Origin::Command { key: "listeners" } => f.write_str("--listener or OBSERVER_LISTENERS"),
            Origin::Command { key } => write!(
                f,
                "--{key} or OBSERVER_{}",
                key.to_ascii_uppercase().replace('-', "_")
            ),
            Origin::File { path, key, line } => {
                write!(f, "`{key}` in {}, line {line}", path.display())
            }
            Origin::RustLog => f.write_str("RUST_LOG"),
            Origin::Default { key } => write!(f, "the default {key}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}; check the path given to --config or OBSERVER_CONFIG"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong kind: toml's message names the
    /// line and column and shows the text.
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// One setting's value is wrong.
    #[error("{origin}: {message}")]
    Value { origin: Origin, message: String },
    /// Two settings contradict each other.
    #[error("{0}")]
    Conflict(String),
}

/// A value and where it came from.
#[derive(Debug, Clone)]
struct Setting<T> {
    value: T,
    origin: Origin,
}

impl<T> Setting<T> {
    fn error(&self, message: String) -> ConfigError {
        ConfigError::Value {
            origin: self.origin.clone(),
            message,
        }
    }
}

/// The configuration file's path and text, to turn a value's position into a line.
#[derive(Debug, Default)]
struct Locator {
    path: PathBuf,
    text: String,
}

impl Locator {
    /// The flag's value (or its variable's) if given, else the file's.
    fn find<T, F: Into<T>>(
        &self,
        key: &'static str,
        flag: Option<T>,
        file: Option<Spanned<F>>,
    ) -> Option<Setting<T>> {
        if let Some(value) = flag {
            return Some(Setting {
                value,
                origin: Origin::Command { key },
            });
        }
        let file = file?;
        let start = file.span().start.min(self.text.len());
        Some(Setting {
            origin: Origin::File {
                path: self.path.clone(),
                key,
                line: self.text[..start].matches('\n').count() + 1,
            },
            value: file.into_inner().into(),
        })
    }

    /// Like [`Locator::find`], falling back to `default`.
    fn pick<T, F: Into<T>>(
        &self,
        key: &'static str,
        flag: Option<T>,
        file: Option<Spanned<F>>,
        default: impl FnOnce() -> T,
    ) -> Setting<T> {
        self.find(key, flag, file).unwrap_or_else(|| Setting {
            value: default(),
            origin: Origin::Default { key },
        })
    }
}

/// The longest path a unix socket can bind (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Settings {
    /// Merges the flags (with their environment variables) over the file over the defaults.
    /// `RUST_LOG` stands in for `--log-level` when neither the flag nor its variable is set.
    pub fn resolve(args: &RunArgs) -> Result<Settings, ConfigError> {
        let rust_log = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
        Self::resolve_with(args, rust_log)
    }

    fn resolve_with(args: &RunArgs, rust_log: Option<String>) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => (FileConfig::default(), Locator::default()),
        };
        Self::resolve_over(args, rust_log, file)
    }

    /// Resolves the flags (and their environment variables, already in `args`) over the
    /// text of a config file at `path`, without reading `path`: for the fuzz targets.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn resolve_file_text(
        args: &RunArgs,
        path: &Path,
        text: String,
    ) -> Result<Settings, ConfigError> {
        Self::resolve_over(args, None, parse_file(path, text)?)
    }

    fn resolve_over(
        args: &RunArgs,
        rust_log: Option<String>,
        (file, at): (FileConfig, Locator),
    ) -> Result<Settings, ConfigError> {
        let socket = at.pick("socket", args.socket.clone(), file.socket, || {
            DEFAULT_SOCKET.into()
        });
        let unit = at.pick("unit", args.unit.clone(), file.unit, || DEFAULT_UNIT.into());
        if !unit.value.contains('.') || unit.value.contains('/') {
            return Err(unit.error(format!(
                "`{}` is not a unit name; give it with its suffix, such as containerd.service",
                unit.value
            )));
        }
        let listeners = at.pick(
            "listeners",
            (!args.listeners.is_empty()).then(|| args.listeners.clone()),
            file.listeners.filter(|l| !l.get_ref().is_empty()),
            || vec![socket.value.clone()],
        );
        if listeners.value.len() > observer_common::MAX_LISTENERS as usize {
            return Err(listeners.error(format!(
                "{} listeners given; at most {} can be watched: name fewer",
                listeners.value.len(),
                observer_common::MAX_LISTENERS
            )));
        }
        let status_socket = at.find(
            "status-socket",
            args.status_socket.clone(),
            file.status_socket,
        );
        if let Some(s) = &status_socket {
            let len = s.value.as_os_str().len();
            if len > MAX_SOCKET_PATH || len == 0 {
                return Err(s.error(format!(
                    "`{}` cannot be a unix socket path: it must be 1 to {MAX_SOCKET_PATH} bytes long, and is {len}; choose a shorter path",
                    s.value.display()
                )));
            }
        }
        let duration = |key, flag, file, default| at.pick(key, flag, file, || default);
        let probe_interval = duration(
            "probe-interval",
            args.probe_interval,
            file.probe_interval,
            Duration::from_secs(2),
        );
        let probe_timeout = duration(
            "probe-timeout",
            args.probe_timeout,
            file.probe_timeout,
            Duration::from_secs(1),
        );
        if probe_timeout.value >= probe_interval.value {
            return Err(ConfigError::Conflict(format!(
                "the probe timeout ({}, from {}) must be shorter than the probe interval ({}, from {}); lower the timeout or raise the interval",
                humantime::format_duration(probe_timeout.value),
                probe_timeout.origin,
                humantime::format_duration(probe_interval.value),
                probe_interval.origin
            )));
        }
        let no_ebpf = at.pick("no-ebpf", args.no_ebpf, file.no_ebpf, || false);
        let fallback_sensors = at.pick(
            "fallback-sensors",
            args.fallback_sensors,
            file.fallback_sensors,
            || false,
        );
        if no_ebpf.value && fallback_sensors.value {
            return Err(ConfigError::Conflict(format!(
                "fallback-sensors (from {}) cannot be combined with no-ebpf (from {}), which turns every kernel sensor off; drop one of them",
                fallback_sensors.origin, no_ebpf.origin
            )));
        }
        let probes = at.find(
            "probes",
            (!args.probes.is_empty()).then(|| args.probes.clone()),
            file.probes,
        );
        if let Some(p) = &probes {
            if !p.value.contains(&Layer::Version) {
                return Err(p.error(
                    "the version layer cannot be left out: it is the liveness probe every verdict starts from; add version to the list".into(),
                ));
            }
            let mut seen = Vec::new();
            for layer in &p.value {
                if seen.contains(layer) {
                    return Err(p.error(format!("{layer} is named twice; name each layer once")));
                }
                seen.push(*layer);
            }
        }
        let snapshotter = at.pick(
            "snapshotter",
            args.snapshotter.clone(),
            file.snapshotter,
            || "overlayfs".into(),
        );
        if snapshotter.value.is_empty() || snapshotter.value.contains(char::is_whitespace) {
            return Err(snapshotter.error(format!(
                "`{}` is not a snapshotter name; give one such as overlayfs",
                snapshotter.value
            )));
        }
        let log_level = match (&args.log_level, rust_log) {
            (Some(level), _) => level.clone(),
            // RUST_LOG keeps its own rules: a bare word there is a target, not a typo.
            (None, Some(filter)) => match tracing_subscriber::EnvFilter::try_new(&filter) {
                Ok(_) => LogLevel(filter),
                Err(e) => {
                    return Err(ConfigError::Value {
                        origin: Origin::RustLog,
                        message: format!(
                            "`{filter}` is not a log filter ({e}); write it like info or info,observer=debug"
                        ),
                    });
                }
            },
            (None, None) => {
                at.pick("log-level", None, file.log_level, || {
                    LogLevel("info".into())
                })
                .value
            }
        };
        Ok(Settings {
            socket: socket.value,
            unit: unit.value,
            bus: at
                .pick("bus", args.bus.clone(), file.bus, || Bus::System)
                .value,
            status_listen: at
                .pick(
                    "status-listen",
                    args.status_listen,
                    file.status_listen,
                    default_status_listen,
                )
                .value,
            status_socket: status_socket.map(|s| s.value),
            probe_interval: probe_interval.value,
            probe_timeout: probe_timeout.value,
            listeners: listeners.value,
            heartbeat_interval: duration(
                "heartbeat-interval",
                args.heartbeat_interval,
                file.heartbeat_interval,
                Duration::from_millis(250),
            )
            .value,
            stall_threshold: duration(
                "stall-threshold",
                args.stall_threshold,
                file.stall_threshold,
                Duration::from_secs(1),
            )
            .value,
            no_ebpf: no_ebpf.value,
            fallback_sensors: fallback_sensors.value,
            no_kubernetes: at
                .pick(
                    "no-kubernetes",
                    args.no_kubernetes,
                    file.no_kubernetes,
                    || false,
                )
                .value,
            dry_run: at
                .pick("dry-run", args.dry_run, file.dry_run, || false)
                .value,
            pause_file: at
                .pick(
                    "pause-file",
                    args.pause_file.clone(),
                    file.pause_file,
                    || DEFAULT_PAUSE_FILE.into(),
                )
                .value,
            kill_grace: duration(
                "kill-grace",
                args.kill_grace,
                file.kill_grace,
                Duration::from_secs(10),
            )
            .value,
            stack_dump_wait: duration(
                "stack-dump-wait",
                args.stack_dump_wait,
                file.stack_dump_wait,
                Duration::from_millis(500),
            )
            .value,
            failures_to_hang: at_least_one(at.pick(
                "failures-to-hang",
                args.failures_to_hang,
                file.failures_to_hang,
                || 3,
            ))?,
            restart_backoff: duration(
                "restart-backoff",
                args.restart_backoff,
                file.restart_backoff,
                Duration::from_secs(10),
            )
            .value,
            max_restarts: at_least_one(at.pick(
                "max-restarts",
                args.max_restarts,
                file.max_restarts,
                || 5,
            ))?,
            dump_stacks: !at
                .pick(
                    "no-stack-dump",
                    args.no_stack_dump,
                    file.no_stack_dump,
                    || false,
                )
                .value,
            log_format: at
                .pick(
                    "log-format",
                    args.log_format,
                    file.log_format,
                    LogFormat::default,
                )
                .value,
            log_level,
            probes: probes.map(|p| p.value),
            ladder_interval: duration(
                "ladder-interval",
                args.ladder_interval,
                file.ladder_interval,
                Duration::from_secs(5),
            )
            .value,
            blocked_threshold: duration(
                "blocked-threshold",
                args.blocked_threshold,
                file.blocked_threshold,
                Duration::from_secs(2),
            )
            .value,
            snapshotter: snapshotter.value,
            kill_hung_shims: at
                .pick(
                    "kill-hung-shims",
                    args.kill_hung_shims,
                    file.kill_hung_shims,
                    || false,
                )
                .value,
        })
    }
}

/// A count that must be positive (the flags' parser checks this too, the file's does not).
fn at_least_one(count: Setting<u32>) -> Result<u32, ConfigError> {
    if count.value == 0 {
        return Err(count.error("0 is not allowed here; give a count of 1 or more".into()));
    }
    Ok(count.value)
}

fn load_file(path: &Path) -> Result<(FileConfig, Locator), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, text)
}

/// Parses the text of the config file at `path` (named in errors).
fn parse_file(path: &Path, text: String) -> Result<(FileConfig, Locator), ConfigError> {
    let config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        // toml's message already names the line and column and shows the offending text.
        message: e.to_string(),
    })?;
    Ok((
        config,
        Locator {
            path: path.to_owned(),
            text,
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn write(contents: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "observer-config-test-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn resolve(args: &RunArgs) -> Result<Settings, ConfigError> {
        Settings::resolve_with(args, None)
    }

    /// Resolves `contents` as the config file with no flags, and returns the error.
    fn file_error(contents: &str) -> String {
        let path = write(contents);
        let err = resolve(&RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .expect_err(contents)
        .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(&path.display().to_string()), "{err}");
        err
    }

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let s = resolve(&RunArgs::default()).unwrap();
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.unit, DEFAULT_UNIT);
        assert_eq!(s.bus, Bus::System);
        assert_eq!(s.status_listen.to_string(), DEFAULT_STATUS_LISTEN);
        assert_eq!(s.status_socket, None);
        assert_eq!(s.listeners, vec![PathBuf::from(DEFAULT_SOCKET)]);
        assert_eq!(s.probe_interval, Duration::from_secs(2));
        assert_eq!(s.probe_timeout, Duration::from_secs(1));
        assert_eq!(s.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(s.stall_threshold, Duration::from_secs(1));
        assert_eq!(s.pause_file, PathBuf::from(DEFAULT_PAUSE_FILE));
        assert_eq!(s.kill_grace, Duration::from_secs(10));
        assert!(
            !s.no_ebpf && !s.fallback_sensors && !s.dry_run && s.dump_stacks && !s.no_kubernetes
        );
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.log_level, LogLevel("info".into()));
    }

    #[test]
    fn every_setting_can_come_from_the_file() {
        let path = write(
            r#"
socket = "/run/x/containerd.sock"
unit = "x.service"
bus = "session"
status-listen = "127.0.0.1:9900"
status-socket = "/run/x/observer.sock"
probe-interval = "5s"
probe-timeout = "2s"
listeners = ["/run/x/a.sock", "/run/x/b.sock"]
heartbeat-interval = "100ms"
stall-threshold = "3s"
no-ebpf = false
fallback-sensors = true
no-kubernetes = true
pause-file = "/run/x/pause"
kill-grace = "20s"
no-stack-dump = true
dry-run = true
log-format = "json"
log-level = "debug"
failures-to-hang = 4
restart-backoff = "30s"
max-restarts = 2
"#,
        );
        let s = resolve(&RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(s.socket, PathBuf::from("/run/x/containerd.sock"));
        assert_eq!(s.unit, "x.service");
        assert_eq!(s.bus, Bus::Session);
        assert_eq!(s.status_listen.to_string(), "127.0.0.1:9900");
        assert_eq!(s.status_socket, Some(PathBuf::from("/run/x/observer.sock")));
        assert_eq!(s.probe_interval, Duration::from_secs(5));
        assert_eq!(s.probe_timeout, Duration::from_secs(2));
        assert_eq!(s.listeners.len(), 2);
        assert_eq!(s.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(s.stall_threshold, Duration::from_secs(3));
        assert!(!s.no_ebpf && s.fallback_sensors && s.dry_run && !s.dump_stacks);
        assert!(s.no_kubernetes);
        assert_eq!(s.pause_file, PathBuf::from("/run/x/pause"));
        assert_eq!(s.kill_grace, Duration::from_secs(20));
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.log_level, LogLevel("debug".into()));
        assert_eq!(s.failures_to_hang, 4);
        assert_eq!(s.restart_backoff, Duration::from_secs(30));
        assert_eq!(s.max_restarts, 2);
    }

    #[test]
    fn listeners_follow_the_socket_unless_given() {
        let args = RunArgs {
            socket: Some("/run/x/containerd.sock".into()),
            ..Default::default()
        };
        assert_eq!(
            resolve(&args).unwrap().listeners,
            vec![PathBuf::from("/run/x/containerd.sock")]
        );
        let args = RunArgs {
            listeners: vec!["/a".into(), "/b".into()],
            ..Default::default()
        };
        assert_eq!(resolve(&args).unwrap().listeners.len(), 2);
    }

    #[test]
    fn probe_layers_come_from_flag_or_file_and_are_checked() {
        let s = resolve(&RunArgs::default()).unwrap();
        assert_eq!(s.probes, None, "by default every layer containerd supports");
        assert_eq!(s.ladder_interval, Duration::from_secs(5));
        assert_eq!(s.blocked_threshold, Duration::from_secs(2));
        assert_eq!(s.snapshotter, "overlayfs");
        assert!(!s.kill_hung_shims, "killing hung shims is off by default");

        let cli = Cli::try_parse_from([
            "observer",
            "--probes",
            "version,tasks,metadata_write",
            "--kill-hung-shims",
        ])
        .unwrap();
        let s = resolve(&cli.run).unwrap();
        assert_eq!(
            s.probes,
            Some(vec![Layer::Version, Layer::Tasks, Layer::MetadataWrite])
        );
        assert!(s.kill_hung_shims);

        let path = write(
            "probes = [\"version\", \"cri\"]\nladder-interval = \"10s\"\nblocked-threshold = \"5s\"\nsnapshotter = \"native\"\nkill-hung-shims = true\n",
        );
        let s = resolve(&RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!(s.probes, Some(vec![Layer::Version, Layer::Cri]));
        assert_eq!(s.ladder_interval, Duration::from_secs(10));
        assert_eq!(s.blocked_threshold, Duration::from_secs(5));
        assert_eq!(s.snapshotter, "native");
        assert!(s.kill_hung_shims);
    }

    #[test]
    fn bad_probe_lists_say_what_to_fix() {
        let err = Cli::try_parse_from(["observer", "--probes", "version,metadata"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a probe layer") && err.contains("metadata_read"),
            "{err}"
        );
        let cli = Cli::try_parse_from(["observer", "--probes", "cri,tasks"]).unwrap();
        let err = resolve(&cli.run).unwrap_err().to_string();
        assert!(err.starts_with("--probes or OBSERVER_PROBES"), "{err}");
        assert!(err.contains("version layer cannot be left out"), "{err}");
        let cli = Cli::try_parse_from(["observer", "--probes", "version,cri,cri"]).unwrap();
        let err = resolve(&cli.run).unwrap_err().to_string();
        assert!(err.contains("cri is named twice"), "{err}");
        let err = file_error("probes = [\"version\", \"snapshot\"]\n");
        assert!(
            err.contains("line 1") && err.contains("not a probe layer"),
            "{err}"
        );
        let err = file_error("probes = [\"tasks\"]\n");
        assert!(
            err.contains("`probes` in") && err.contains("line 1"),
            "{err}"
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let path = write("unit = \"from-file.service\"\nprobe-interval = \"5s\"\ndry-run = true\n");
        let args = RunArgs {
            config: Some(path.clone()),
            unit: Some("from-flag.service".into()),
            dry_run: Some(false),
            ..Default::default()
        };
        let s = resolve(&args).unwrap();
        assert_eq!(s.unit, "from-flag.service");
        assert_eq!(s.probe_interval, Duration::from_secs(5));
        assert!(!s.dry_run, "--dry-run=false beats the file's true");
        std::fs::remove_file(path).unwrap();
    }

    /// Set by [`precedence_flag_env_file_default`] in the copy of this binary it runs.
    const CHILD: &str = "OBSERVER_CONFIG_TEST_CHILD";

    /// Flags beat variables beat the file beats the defaults. Runs in a child process with
    /// its own environment: changing this process's would race with the other tests.
    #[test]
    fn precedence_flag_env_file_default() {
        let path = write(
            "unit = \"file.service\"\nprobe-interval = \"3s\"\nstall-threshold = \"700ms\"\ndry-run = true\nlog-level = \"warn\"\n",
        );
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "config::tests::precedence_in_child",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env("OBSERVER_CONFIG", &path)
            .env("OBSERVER_UNIT", "env.service")
            .env("OBSERVER_PROBE_INTERVAL", "5s")
            .env("OBSERVER_DRY_RUN", "false")
            .env("RUST_LOG", "debug");
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("OBSERVER_") && !key.starts_with("OBSERVER_CONFIG") {
                child.env_remove(&key);
            }
        }
        let out = child.output().unwrap();
        std::fs::remove_file(path).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
    }

    #[test]
    fn precedence_in_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let cli = Cli::try_parse_from(["observer", "--unit", "flag.service"]).unwrap();
        let s = Settings::resolve(&cli.run).unwrap();
        assert_eq!(
            s.unit, "flag.service",
            "the flag beats its variable and the file"
        );
        assert_eq!(
            s.probe_interval,
            Duration::from_secs(5),
            "the variable beats the file"
        );
        assert!(!s.dry_run, "OBSERVER_DRY_RUN=false beats the file's true");
        assert_eq!(
            s.stall_threshold,
            Duration::from_millis(700),
            "the file beats the default"
        );
        assert_eq!(
            s.heartbeat_interval,
            Duration::from_millis(250),
            "the default"
        );
        assert_eq!(
            s.log_level,
            LogLevel("debug".into()),
            "RUST_LOG beats the file"
        );
        let cli = Cli::try_parse_from(["observer", "--log-level", "error"]).unwrap();
        let s = Settings::resolve(&cli.run).unwrap();
        assert_eq!(
            s.log_level,
            LogLevel("error".into()),
            "--log-level beats RUST_LOG"
        );
    }

    #[test]
    fn boolean_flags_take_an_optional_value() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.run.dry_run);
        assert_eq!(parse(&["observer", "--dry-run"]).unwrap(), Some(true));
        assert_eq!(
            parse(&["observer", "--dry-run=false"]).unwrap(),
            Some(false)
        );
        assert_eq!(parse(&["observer", "--dry-run=yes"]).unwrap(), Some(true));
        assert!(parse(&["observer", "--dry-run=maybe"]).is_err());
    }

    #[test]
    fn bad_flag_values_are_refused_by_the_parser_with_a_hint() {
        let err = |args: &[&str]| Cli::try_parse_from(args).unwrap_err().to_string();
        assert!(err(&["observer", "--probe-interval", "0s"]).contains("positive duration"));
        assert!(err(&["observer", "--status-listen", "localhost"]).contains("127.0.0.1:9847"));
        assert!(err(&["observer", "--log-format", "xml"]).contains("`text` or `json`"));
        assert!(err(&["observer", "--log-level", "verbose"]).contains("info,observer=debug"));
        assert!(err(&["observer", "--bus", "tcp"]).contains("session"));
    }

    #[test]
    fn a_missing_file_says_which_and_where_it_was_named() {
        let err = resolve(&RunArgs {
            config: Some("/nonexistent/observer.toml".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/observer.toml"), "{err}");
        assert!(err.contains("--config"), "{err}");
    }

    /// Every error a file can hold names the file, the line and what to write instead.
    #[test]
    fn file_errors_name_the_line_and_the_fix() {
        let cases: &[(&str, &[&str])] = &[
            (
                "unit = \"x.service\"\nprobe-intervall = \"5s\"\n",
                &["line 2", "probe-intervall", "probe-interval"],
            ),
            ("unit = \"x.service\n", &["line 1"]),
            ("\nprobe-interval = 5\n", &["line 2", "string"]),
            (
                "probe-interval = \"5 parsecs\"\n",
                &["line 1", "write it like 2s"],
            ),
            (
                "\n\nkill-grace = \"0s\"\n",
                &["line 3", "positive duration"],
            ),
            ("bus = \"tcp\"\n", &["line 1", "`system`, `session`"]),
            (
                "status-listen = \"localhost\"\n",
                &["line 1", "127.0.0.1:9847"],
            ),
            ("log-format = \"xml\"\n", &["line 1", "`text` or `json`"]),
            (
                "log-level = \"verbose\"\n",
                &["line 1", "info,observer=debug"],
            ),
            ("dry-run = \"yes\"\n", &["line 1", "bool"]),
            (
                "\nfailures-to-hang = 0\n",
                &["`failures-to-hang`", "line 2", "1 or more"],
            ),
            (
                "max-restarts = 0\n",
                &["`max-restarts`", "line 1", "1 or more"],
            ),
            ("max-restarts = -1\n", &["line 1"]),
            (
                "listeners = [\"/a\", \"/b\", \"/c\", \"/d\", \"/e\"]\n",
                &["`listeners`", "line 1", "name fewer"],
            ),
            (
                "\nunit = \"containerd\"\n",
                &["`unit`", "line 2", "containerd.service"],
            ),
            (
                &format!("status-socket = \"/{}\"\n", "x".repeat(120)),
                &["`status-socket`", "line 1", "shorter path"],
            ),
            (
                "no-ebpf = true\nfallback-sensors = true\n",
                &[
                    "`fallback-sensors`",
                    "line 2",
                    "`no-ebpf`",
                    "line 1",
                    "drop one",
                ],
            ),
            (
                "probe-interval = \"1s\"\n",
                &[
                    "the default probe-timeout",
                    "`probe-interval`",
                    "line 1",
                    "raise the interval",
                ],
            ),
        ];
        for (contents, wanted) in cases {
            let err = file_error(contents);
            for w in *wanted {
                assert!(
                    err.contains(w),
                    "error for {contents:?} lacks {w:?}:\n{err}"
                );
            }
        }
    }

    #[test]
    fn flag_errors_name_the_flag_and_its_variable() {
        let err = resolve(&RunArgs {
            listeners: (0..5).map(|i| PathBuf::from(format!("/s{i}"))).collect(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--listener or OBSERVER_LISTENERS"), "{err}");
        let err = resolve(&RunArgs {
            probe_interval: Some(Duration::from_secs(1)),
            probe_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--probe-timeout or OBSERVER_PROBE_TIMEOUT"),
            "{err}"
        );
        assert!(
            err.contains("--probe-interval or OBSERVER_PROBE_INTERVAL"),
            "{err}"
        );
        let err = Settings::resolve_with(&RunArgs::default(), Some("info=bogus".into()))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("RUST_LOG: "), "{err}");
        let s = Settings::resolve_with(&RunArgs::default(), Some("observer".into())).unwrap();
        assert_eq!(
            s.log_level,
            LogLevel("observer".into()),
            "a target alone is fine in RUST_LOG"
        );
    }

    #[test]
    fn status_finds_the_agent_by_flag_then_file_then_default() {
        let args = StatusArgs::default();
        assert_eq!(
            args.target().unwrap(),
            StatusTarget::Tcp(DEFAULT_STATUS_LISTEN.parse().unwrap())
        );
        let path = write("status-listen = \"127.0.0.1:9900\"\nstatus-socket = \"/run/o.sock\"\n");
        let from_file = StatusArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(
            from_file.target().unwrap(),
            StatusTarget::Unix("/run/o.sock".into())
        );
        let flag = StatusArgs {
            status_listen: Some("127.0.0.1:9901".parse().unwrap()),
            ..from_file
        };
        assert_eq!(
            flag.target().unwrap(),
            StatusTarget::Tcp("127.0.0.1:9901".parse().unwrap())
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zero_duration_is_refused() {
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }
}
