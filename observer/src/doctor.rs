//! `observer doctor`: what the agent would use on this node, tried for real, without starting it.
//!
//! Like tetragon's `tetra probe config`, but it does not guess from kernel versions: it loads and
//! attaches the kernel programs through the agent's own loader ([`Sensors::start`], which picks
//! each sensor's tier: fentry, tp_btf, tracepoint, or the fallback), samples the fallbacks,
//! asks containerd for `Version()`, and connects to systemd over D-Bus as the agent would. Each
//! check says what it found and, where something is missing, the exact fix. Everything is
//! undone when the command ends: the programs detach when the sensors drop.

use std::{path::Path, time::Duration};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    act::systemd::{Systemd, SystemdError},
    config::Settings,
    report::status::SensorStatus,
    sense::{
        fallback::{pidfd::PidExitWatch, sockdiag},
        kernel::{btf, fentry, layout},
        probe,
        sensors::Sensors,
    },
};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Works as the agent wants it.
    Ok,
    /// Works, with less than the best this agent can do (a fallback, a lower tier, a gap).
    Degraded,
    /// Missing, but the agent runs without it.
    Off,
    /// Missing, and the agent needs it: `observer doctor` exits non-zero.
    Missing,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Degraded => "degraded",
            Verdict::Off => "off",
            Verdict::Missing => "MISSING",
        }
    }
}

/// One thing the agent relies on, and how it stands on this node.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked: `privileges`, `kernel BTF`, `process exit`, `D-Bus`, ...
    pub name: &'static str,
    pub verdict: Verdict,
    /// For a sensor: the layer it would run on (`fentry`, `tp_btf`, `tracepoint`,
    /// `fallback` or `off`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<&'static str>,
    /// What was found, or what the sensor would use.
    pub found: String,
    /// Why a higher tier or a part of the data is not available.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// What to do about it, when something is missing or degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(name: &'static str, verdict: Verdict, found: impl Into<String>) -> Self {
        Self {
            name,
            verdict,
            layer: None,
            found: found.into(),
            notes: Vec::new(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Everything `observer doctor` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub unit: String,
    pub socket: String,
    pub bus: String,
    pub checks: Vec<Check>,
    /// Whether the agent has everything it needs here.
    pub ready: bool,
}

impl Report {
    /// The names of the checks the agent cannot do without and that failed.
    pub fn missing(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| c.verdict == Verdict::Missing)
            .map(|c| c.name)
            .collect()
    }

    /// The report for people: one line per check, then its notes and fix indented.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "observer doctor: unit {} on the {} bus, containerd at {}\n\n",
            self.unit, self.bus, self.socket
        );
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for check in &self.checks {
            let layer = check.layer.map(|l| format!("[{l}] ")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<8}  {:<width$}  {layer}{}",
                check.verdict.label(),
                check.name,
                check.found
            );
            let indent = " ".repeat(14 + width);
            for note in &check.notes {
                let _ = writeln!(out, "{indent}note: {note}");
            }
            if let Some(fix) = &check.fix {
                let _ = writeln!(out, "{indent}fix: {fix}");
            }
        }
        let missing = self.missing();
        if missing.is_empty() {
            out.push_str("\nready: the agent has what it needs on this node\n");
        } else {
            let _ = writeln!(
                out,
                "\nNOT READY: the agent needs {}; see the fixes above",
                missing.join(", ")
            );
        }
        out
    }
}

/// Runs every check with the agent's settings. Needs a Tokio runtime (the loader forwards
/// ring buffers on it); takes a few seconds at most, bounded by the probe timeout and D-Bus.
pub async fn examine(settings: &Settings) -> Report {
    let mut checks = vec![privileges(), kernel_btf(), tracefs()];
    checks.extend(sensors(settings));
    checks.push(containerd(settings).await);
    checks.extend(systemd(settings).await);
    let mut report = Report {
        unit: settings.unit.clone(),
        socket: settings.socket.display().to_string(),
        bus: settings.bus.to_string(),
        checks,
        ready: false,
    };
    report.ready = report.missing().is_empty();
    report
}

fn privileges() -> Check {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return Check::new("privileges", Verdict::Ok, "root: eBPF programs can load");
    }
    Check::new(
        "privileges",
        Verdict::Degraded,
        format!(
            "not root (uid {euid}): eBPF cannot load, the sensors fall back to pidfd and sock_diag"
        ),
    )
    .fix("run the agent as root with CAP_BPF and CAP_PERFMON, as the DaemonSet and the unit do")
}

fn kernel_btf() -> Check {
    let path = btf::SYS_FS_PATH;
    match std::fs::metadata(path) {
        Ok(meta) => Check::new(
            "kernel BTF",
            Verdict::Ok,
            format!("{path} ({:.1} MiB)", meta.len() as f64 / f64::from(1 << 20)),
        ),
        Err(e) => Check::new(
            "kernel BTF",
            Verdict::Degraded,
            format!("no BTF at {path} ({e}): no tp_btf or fentry programs, no exit codes"),
        )
        .fix(
            "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is); \
             in a container, mount the host's /sys/kernel/btf",
        ),
    }
}

fn tracefs() -> Check {
    match layout::mounted_tracefs() {
        Some(root) => Check::new("tracefs", Verdict::Ok, format!("mounted at {root}")),
        // Mounted, but closed to this user (tracefs is root's alone by default).
        None if let Some(root) = layout::TRACEFS_ROOTS.iter().find(|root| {
            std::fs::read_dir(root).is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
        }) => Check::new(
            "tracefs",
            Verdict::Degraded,
            format!("{root} is not readable by this user: the tracepoint formats cannot be read"),
        )
        .fix("run the agent as root"),
        None => Check::new(
            "tracefs",
            Verdict::Degraded,
            "tracefs not mounted: the tracepoint programs cannot read their record formats",
        )
        .fix("mount -t tracefs nodev /sys/kernel/tracing (in the DaemonSet: the host's /sys/kernel/tracing, mounted as in deploy/kubernetes/daemonset.yaml)"),
    }
}

/// Starts the sensors exactly as the agent does, reads what each runs on, and stops them.
fn sensors(settings: &Settings) -> Vec<Check> {
    // The events are not read: the channel only has to exist while the programs load.
    let (events, _unread) = mpsc::channel(16);
    let mut started = Sensors::start(settings, events);
    let record = started.record(false);
    drop(started);
    let mut checks = vec![
        sensor_check("process exit", &record.process_exit, settings, true),
        sensor_check("exit cause", &record.exit_cause, settings, false),
        sensor_check("accept queue", &record.accept_queue, settings, true),
        sensor_check("blocked threads", &record.blocked_threads, settings, true),
    ];
    // A fallback is only as good as its mechanism: try each on this node.
    if record.process_exit.state == "fallback" {
        let check = &mut checks[0];
        if let Err(e) = PidExitWatch::open(std::process::id()) {
            check.verdict = Verdict::Missing;
            check.notes.push(format!("the fallback fails here: {e}"));
        }
    }
    if record.accept_queue.state == "fallback" {
        let check = &mut checks[2];
        // The listeners the agent would sample (containerd's socket unless --listener says).
        for listener in &settings.listeners {
            match sockdiag::sample_listener(listener) {
                Err(e) => {
                    check.verdict = Verdict::Missing;
                    check.notes.push(format!("the fallback fails here: {e}"));
                }
                Ok(samples) if samples.is_empty() => check.notes.push(format!(
                    "sock_diag sees no listener at {} (yet)",
                    listener.display()
                )),
                Ok(_) => {}
            }
        }
    }
    if record.blocked_threads.state == "fallback"
        && let Err(e) = std::fs::read_dir(format!("/proc/{}/task", std::process::id()))
    {
        let check = &mut checks[3];
        check.verdict = Verdict::Missing;
        check
            .notes
            .push(format!("the fallback fails here: /proc/<pid>/task: {e}"));
    }
    checks
}

/// One sensor's check from the state the loader left it in. `needed`: whether the agent
/// misses it when neither eBPF nor its fallback runs (the exit cause has no fallback and
/// is never needed).
fn sensor_check(
    name: &'static str,
    status: &SensorStatus,
    settings: &Settings,
    needed: bool,
) -> Check {
    let (verdict, layer) = match status.state {
        "on" => (Verdict::Ok, status.path.unwrap_or(fentry::path::TRACEPOINT)),
        "fallback" => (Verdict::Degraded, "fallback"),
        _ if settings.no_ebpf => (Verdict::Off, "off"),
        _ if needed => (Verdict::Missing, "off"),
        _ => (Verdict::Degraded, "off"),
    };
    let mut check = Check::new(name, verdict, status.hook.clone());
    check.layer = Some(layer);
    check.notes.clone_from(&status.notes);
    if let Some(reason) = &status.reason {
        check.notes.insert(0, reason.clone());
    }
    if settings.no_ebpf {
        check.fix = Some("drop --no-ebpf (OBSERVER_NO_EBPF) to run the kernel sensors".into());
    } else if settings.fallback_sensors && status.state != "on" {
        check.fix = Some("drop --fallback-sensors to try the kernel programs".into());
    }
    check
}

async fn containerd(settings: &Settings) -> Check {
    let result = probe::probe_version(&settings.socket, settings.probe_timeout).await;
    match result.outcome {
        Ok(version) => Check::new(
            "containerd",
            Verdict::Ok,
            format!(
                "Version() answered {version} in {} ms",
                result.latency.as_millis()
            ),
        ),
        Err((failure, detail)) => Check::new(
            "containerd",
            Verdict::Missing,
            format!(
                "Version() on {} failed ({failure:?}): {detail}",
                settings.socket.display()
            ),
        )
        .fix(socket_fix(&settings.socket)),
    }
}

fn socket_fix(socket: &Path) -> String {
    if socket.exists() {
        format!(
            "{} exists but containerd does not answer on it: check that containerd runs \
             (systemctl status containerd) and that --socket names its [grpc] address",
            socket.display()
        )
    } else {
        format!(
            "there is no socket at {}: pass --socket (OBSERVER_SOCKET) with the [grpc] address \
             of containerd's config (default /run/containerd/containerd.sock); in the DaemonSet, \
             mount its directory from the host",
            socket.display()
        )
    }
}

/// Bounds the D-Bus checks: a bus that accepts but never answers must not hang the doctor.
const BUS_TIMEOUT: Duration = Duration::from_secs(10);

async fn systemd(settings: &Settings) -> Vec<Check> {
    let bus = settings.bus.to_string();
    let connected =
        tokio::time::timeout(BUS_TIMEOUT, Systemd::connect(&settings.bus, &settings.unit)).await;
    let unknown_unit = |why: &str| {
        Check::new(
            "unit",
            Verdict::Missing,
            format!("{} not checked: {why}", settings.unit),
        )
    };
    let systemd = match connected {
        Err(_) => {
            return vec![
                Check::new(
                    "D-Bus",
                    Verdict::Missing,
                    format!("the {bus} bus did not answer within {}s", BUS_TIMEOUT.as_secs()),
                )
                .fix("check that dbus-daemon and systemd run, and that --bus names the bus systemd is on"),
                unknown_unit("the bus did not answer"),
            ];
        }
        Ok(Err(e @ SystemdError::Connect { .. })) => {
            return vec![
                Check::new("D-Bus", Verdict::Missing, e.to_string()).fix(bus_fix(settings)),
                unknown_unit("no bus"),
            ];
        }
        Ok(Err(e @ SystemdError::NotLoaded { .. })) => {
            return vec![
                bus_reached(&bus),
                Check::new("unit", Verdict::Missing, e.to_string()).fix(format!(
                    "pass --unit (OBSERVER_UNIT) with the unit that runs containerd \
                     (systemctl list-units '*containerd*'); {} is not it",
                    settings.unit
                )),
            ];
        }
        Ok(Err(e)) => {
            return vec![
                bus_reached(&bus),
                Check::new("unit", Verdict::Missing, e.to_string()).fix(
                    "the observer must be allowed to call org.freedesktop.systemd1 \
                     (LoadUnit, RestartUnit): run it as root or allow it in a polkit rule",
                ),
            ];
        }
        Ok(Ok(systemd)) => systemd,
    };
    let unit = match tokio::time::timeout(BUS_TIMEOUT, systemd.status()).await {
        Ok(Ok(status)) => {
            let pid = status
                .main_pid
                .map_or_else(|| "no main PID".to_owned(), |p| format!("main PID {p}"));
            let found = format!(
                "{} is loaded, {} ({}), {pid}",
                settings.unit, status.active_state, status.sub_state
            );
            if status.active_state == "active" {
                Check::new("unit", Verdict::Ok, found)
            } else {
                Check::new("unit", Verdict::Degraded, found).fix(format!(
                    "start it (systemctl start {}); the agent watches it all the same",
                    settings.unit
                ))
            }
        }
        Ok(Err(e)) => Check::new(
            "unit",
            Verdict::Missing,
            format!("cannot read its state: {e}"),
        ),
        Err(_) => Check::new(
            "unit",
            Verdict::Missing,
            format!(
                "systemd did not report the unit's state within {}s",
                BUS_TIMEOUT.as_secs()
            ),
        ),
    };
    vec![bus_reached(&bus), unit]
}

fn bus_reached(bus: &str) -> Check {
    Check::new(
        "D-Bus",
        Verdict::Ok,
        format!("systemd answers on the {bus} bus"),
    )
}

fn bus_fix(settings: &Settings) -> String {
    match &settings.bus {
        crate::config::Bus::System => {
            "start dbus (systemctl status dbus); in the DaemonSet, mount \
             the host's /run/dbus/system_bus_socket"
                .into()
        }
        crate::config::Bus::Session => {
            "set DBUS_SESSION_BUS_ADDRESS, or pass --bus with the address of the bus systemd is on"
                .into()
        }
        crate::config::Bus::Address(a) => format!(
            "nothing answers at {a}: pass --bus (OBSERVER_BUS) with the address of the bus \
             systemd is on, e.g. unix:path=/run/dbus/system_bus_socket"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>) -> Report {
        let mut report = Report {
            unit: "containerd.service".into(),
            socket: "/run/containerd/containerd.sock".into(),
            bus: "system".into(),
            checks,
            ready: false,
        };
        report.ready = report.missing().is_empty();
        report
    }

    #[test]
    fn a_missing_need_makes_the_report_not_ready_and_names_the_fix() {
        let r = report(vec![
            Check::new("tracefs", Verdict::Degraded, "not mounted").fix("mount -t tracefs"),
            Check::new("containerd", Verdict::Missing, "no socket").fix("pass --socket"),
        ]);
        assert!(!r.ready);
        assert_eq!(r.missing(), vec!["containerd"]);
        let text = r.render();
        assert!(text.contains("MISSING"), "{text}");
        assert!(text.contains("fix: pass --socket"), "{text}");
        assert!(
            text.contains("NOT READY: the agent needs containerd"),
            "{text}"
        );
    }

    #[test]
    fn degraded_checks_leave_the_report_ready() {
        let r = report(vec![
            Check::new("kernel BTF", Verdict::Degraded, "no BTF"),
            Check::new("unit", Verdict::Ok, "loaded"),
        ]);
        assert!(r.ready);
        assert!(r.render().contains("\nready:"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][0]["verdict"], "degraded");
        assert_eq!(json["ready"], true);
    }
}
