//! The agent's settings: command-line flags, `OBSERVER_*` environment variables and an
//! optional TOML file, merged in that order of precedence over the built-in defaults.
//!
//! Flags and environment variables are read by clap (a flag wins over its variable); the file
//! fills in whatever neither gave. Errors name the file, the line and what to fix.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// Default path of containerd's gRPC socket.
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";
/// Default systemd unit running containerd.
pub const DEFAULT_UNIT: &str = "containerd.service";
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
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Address of the running observer's status endpoint.
    #[arg(long, env = "OBSERVER_STATUS_LISTEN", default_value = DEFAULT_STATUS_LISTEN)]
    pub status_listen: SocketAddr,
    /// Print the raw JSON status document.
    #[arg(long)]
    pub json: bool,
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
    /// Address of the HTTP status endpoint [default: 127.0.0.1:9847]
    #[arg(long, env = "OBSERVER_STATUS_LISTEN", value_name = "ADDR")]
    pub status_listen: Option<SocketAddr>,
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
    #[arg(long, env = "OBSERVER_NO_EBPF")]
    pub no_ebpf: bool,
    /// Use the sensors that need no eBPF (pidfd, sock_diag) even where eBPF would load; the
    /// agent falls back to them by itself when eBPF is unavailable.
    #[arg(long, env = "OBSERVER_FALLBACK_SENSORS", conflicts_with = "no_ebpf")]
    pub fallback_sensors: bool,
    /// Decide and record, but never restart anything.
    #[arg(long, env = "OBSERVER_DRY_RUN")]
    pub dry_run: bool,
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

/// The optional configuration file. Unknown keys are errors, so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    socket: Option<PathBuf>,
    unit: Option<String>,
    bus: Option<String>,
    status_listen: Option<String>,
    probe_interval: Option<String>,
    probe_timeout: Option<String>,
    listeners: Option<Vec<PathBuf>>,
    heartbeat_interval: Option<String>,
    stall_threshold: Option<String>,
    no_ebpf: Option<bool>,
    fallback_sensors: Option<bool>,
    dry_run: Option<bool>,
}

/// Settings the agent runs with, after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub unit: String,
    pub bus: Bus,
    pub status_listen: SocketAddr,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    /// Listening sockets whose accept queue is watched; never empty.
    pub listeners: Vec<PathBuf>,
    pub heartbeat_interval: Duration,
    pub stall_threshold: Duration,
    pub no_ebpf: bool,
    pub fallback_sensors: bool,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "probe timeout ({timeout:?}) must be shorter than the probe interval ({interval:?}); lower --probe-timeout or raise --probe-interval"
    )]
    TimeoutNotBelowInterval {
        timeout: Duration,
        interval: Duration,
    },
}

impl Settings {
    /// Merges the flags (with their environment variables) over the file over the defaults.
    pub fn resolve(args: &RunArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let path = args.config.clone().unwrap_or_default();
        let invalid = |key: &str, e: String| ConfigError::Invalid {
            path: path.clone(),
            message: format!("`{key}`: {e}"),
        };
        let bus = match (&args.bus, &file.bus) {
            (Some(b), _) => b.clone(),
            (None, Some(b)) => b.parse().map_err(|e| invalid("bus", e))?,
            (None, None) => Bus::System,
        };
        let status_listen = match (args.status_listen, &file.status_listen) {
            (Some(a), _) => a,
            (None, Some(a)) => a.parse().map_err(|e| {
                invalid(
                    "status-listen",
                    format!("`{a}` is not an address ({e}); write it like 127.0.0.1:9847"),
                )
            })?,
            (None, None) => DEFAULT_STATUS_LISTEN
                .parse()
                .expect("default address parses"),
        };
        let duration = |flag: Option<Duration>, key: &str, value: &Option<String>, default| match (
            flag, value,
        ) {
            (Some(d), _) => Ok(d),
            (None, Some(v)) => parse_duration(v).map_err(|e| invalid(key, e)),
            (None, None) => Ok(default),
        };
        let socket: PathBuf = args
            .socket
            .clone()
            .or(file.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into());
        let listeners = if !args.listeners.is_empty() {
            args.listeners.clone()
        } else {
            file.listeners
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| vec![socket.clone()])
        };
        if listeners.len() > observer_common::MAX_LISTENERS as usize {
            return Err(invalid(
                "listeners",
                format!(
                    "{} listeners given; at most {} can be watched",
                    listeners.len(),
                    observer_common::MAX_LISTENERS
                ),
            ));
        }
        let settings = Settings {
            socket,
            unit: args
                .unit
                .clone()
                .or(file.unit)
                .unwrap_or_else(|| DEFAULT_UNIT.into()),
            bus,
            status_listen,
            probe_interval: duration(
                args.probe_interval,
                "probe-interval",
                &file.probe_interval,
                Duration::from_secs(2),
            )?,
            probe_timeout: duration(
                args.probe_timeout,
                "probe-timeout",
                &file.probe_timeout,
                Duration::from_secs(1),
            )?,
            listeners,
            heartbeat_interval: duration(
                args.heartbeat_interval,
                "heartbeat-interval",
                &file.heartbeat_interval,
                Duration::from_millis(250),
            )?,
            stall_threshold: duration(
                args.stall_threshold,
                "stall-threshold",
                &file.stall_threshold,
                Duration::from_secs(1),
            )?,
            no_ebpf: args.no_ebpf || file.no_ebpf.unwrap_or(false),
            fallback_sensors: args.fallback_sensors || file.fallback_sensors.unwrap_or(false),
            dry_run: args.dry_run || file.dry_run.unwrap_or(false),
        };
        if settings.no_ebpf && settings.fallback_sensors {
            return Err(invalid(
                "fallback-sensors",
                "cannot be combined with no-ebpf, which turns every kernel sensor off".into(),
            ));
        }
        if settings.probe_timeout >= settings.probe_interval {
            return Err(ConfigError::TimeoutNotBelowInterval {
                timeout: settings.probe_timeout,
                interval: settings.probe_interval,
            });
        }
        Ok(settings)
    }
}

fn load_file(path: &PathBuf) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.clone(),
        // toml's message already names the line and column and shows the offending text.
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(contents: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "observer-config-test-{}-{}.toml",
            std::process::id(),
            contents.len()
        ));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn defaults_apply_without_flags_or_file() {
        let s = Settings::resolve(&RunArgs::default()).unwrap();
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.unit, DEFAULT_UNIT);
        assert_eq!(s.bus, Bus::System);
        assert_eq!(s.status_listen.to_string(), DEFAULT_STATUS_LISTEN);
        assert_eq!(s.listeners, vec![PathBuf::from(DEFAULT_SOCKET)]);
    }

    #[test]
    fn listeners_follow_the_socket_unless_given() {
        let args = RunArgs {
            socket: Some("/run/x/containerd.sock".into()),
            ..Default::default()
        };
        assert_eq!(
            Settings::resolve(&args).unwrap().listeners,
            vec![PathBuf::from("/run/x/containerd.sock")]
        );
        let args = RunArgs {
            listeners: vec!["/a".into(), "/b".into()],
            ..Default::default()
        };
        assert_eq!(Settings::resolve(&args).unwrap().listeners.len(), 2);
        let args = RunArgs {
            listeners: (0..5).map(|i| PathBuf::from(format!("/s{i}"))).collect(),
            ..Default::default()
        };
        assert!(Settings::resolve(&args).is_err());
    }

    #[test]
    fn flags_win_over_the_file() {
        let path = write("unit = \"from-file.service\"\nprobe-interval = \"5s\"\n");
        let args = RunArgs {
            config: Some(path.clone()),
            unit: Some("from-flag.service".into()),
            ..Default::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!(s.unit, "from-flag.service");
        assert_eq!(s.probe_interval, Duration::from_secs(5));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn unknown_key_is_an_error_naming_the_line() {
        let path = write("unit = \"x.service\"\nprobe-intervall = \"5s\"\n");
        let err = Settings::resolve(&RunArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("probe-intervall"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_bus_says_what_is_accepted() {
        let err = "tcp".parse::<Bus>().unwrap_err();
        assert!(err.contains("system"), "{err}");
        assert_eq!(
            "unix:path=/run/x/bus".parse::<Bus>().unwrap(),
            Bus::Address("unix:path=/run/x/bus".into())
        );
    }

    #[test]
    fn timeout_must_be_below_interval() {
        let args = RunArgs {
            probe_interval: Some(Duration::from_secs(1)),
            probe_timeout: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        assert!(matches!(
            Settings::resolve(&args),
            Err(ConfigError::TimeoutNotBelowInterval { .. })
        ));
    }

    #[test]
    fn zero_duration_is_refused() {
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }
}
