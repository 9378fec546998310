//! The fault zoo as a benchmark: every fault of [`crate::fault`] and [`crate::inject`] (and
//! the crash, freeze and wedged stop of [`super::recovery`]) against four watchdogs, each
//! timed the same way: from the fault to the watchdog's right verdict, whether it acted,
//! whether acting was right, and from the fault to the first `Version()` a new containerd
//! answers where a restart is the remedy.
//!
//! What is right differs by fault ([`Remedy`]): one restart for a containerd that died or
//! hung; a report and no restart for a storage stall or a hung shim (a restart does not
//! help, and can hurt); one restart and then a report for a startup hang (every restart
//! hangs the same way); nothing at all for a fault of the observer's surroundings.
//!
//! The watchdogs:
//! - the observer, fused (default) and polling-only, and as the Gardener-like reference
//!   (`Version()` every 30 s, restart after about 60 s of failure): [`Config`];
//! - a node-problem-detector-like reference, as NPD's shipped containerd health check does it:
//!   CRI `ListPodSandbox` (what `crictl pods --latest` asks) every 10 s with a 10 s deadline;
//!   one failure kills the main process (`systemctl kill --kill-who=main`, SIGTERM), but not
//!   within 2 minutes of the unit's start. It relies on the unit's `Restart=always` to bring
//!   containerd back, so its sandbox has the packaged unit's `Restart=always`,
//!   `RestartSec=5`; the observer's sandboxes have `Restart=no`, so that every restart there
//!   is the observer's.
//!
//! Every sandbox here keeps systemd's default `TimeoutStopSec` (90 s), as the packaged unit
//! does, so a stop that hangs is cut short by the watchdog or not at all.
//!
//! A watchdog that never reaches a verdict, or whose action never brings a new containerd,
//! is recorded as such ("never"), within bounded windows.

use std::{
    fs,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use serde_json::Value;

use super::{
    Summary, parse_rfc3339,
    recovery::{
        Config, LOG_ARGS, RECOVERY_TIMEOUT, Scenario, child_named, first_answer, random_below,
    },
    summarize, wall_ms,
};
use crate::{
    Container, FrozenRoot, Observer, Sandbox, SandboxOptions, StartupHang, StoppedShim,
    cri::list_pod_sandbox, fault, signal,
};

/// A fault of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// `SIGKILL` of containerd.
    Crash,
    /// The kernel's memcg OOM killer ends containerd.
    OomKill,
    /// `SIGSTOP` of containerd.
    Freeze,
    /// The cgroup2 freezer of containerd's cgroup.
    CgroupFreeze,
    /// containerd out of file descriptors, its backlog growing.
    FdExhaustion,
    /// `SIGSTOP` of containerd under a main process that ignores `SIGTERM`.
    Wedge,
    /// containerd's socket file moved away while it runs.
    SocketRemoved,
    /// The bus daemon stopped for 5 s and started again (a dbus upgrade): the observer's
    /// surroundings, not containerd.
    BusRestart,
    /// systemd re-executes itself (`systemctl daemon-reexec`).
    DaemonReexec,
    /// containerd's root filesystem frozen (`fsfreeze` of the sandbox's loop mount): its
    /// writes block in D state while `Version()` answers.
    StorageStall,
    /// One container's shim stopped (`SIGSTOP`): containerd answers, its calls to the shim
    /// do not return.
    HungShim,
    /// containerd started while its metadata database's lock is held: it runs and never
    /// serves its socket, and every restart hangs the same way (containerd #13848).
    StartupHang,
}

/// What a careful operator does about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    /// One restart of containerd.
    Restart,
    /// Report it, restart nothing.
    Report,
    /// One restart (it may have been a one-off), then report it and restart no more.
    OneRestartThenReport,
    /// Nothing: containerd never noticed.
    Nothing,
}

impl Fault {
    pub const ALL: [Fault; 12] = [
        Fault::Crash,
        Fault::OomKill,
        Fault::Freeze,
        Fault::CgroupFreeze,
        Fault::FdExhaustion,
        Fault::Wedge,
        Fault::SocketRemoved,
        Fault::StorageStall,
        Fault::HungShim,
        Fault::StartupHang,
        Fault::BusRestart,
        Fault::DaemonReexec,
    ];

    /// The name `--zoo-faults` takes.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Crash => "crash",
            Fault::OomKill => "oom-kill",
            Fault::Freeze => "freeze",
            Fault::CgroupFreeze => "cgroup-freeze",
            Fault::FdExhaustion => "fd-exhaustion",
            Fault::Wedge => "wedge",
            Fault::SocketRemoved => "socket-removed",
            Fault::StorageStall => "storage-stall",
            Fault::HungShim => "hung-shim",
            Fault::StartupHang => "startup-hang",
            Fault::BusRestart => "bus-restart",
            Fault::DaemonReexec => "daemon-reexec",
        }
    }

    /// The fault `name` names.
    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn label(self) -> &'static str {
        match self {
            Fault::Crash => "crash (SIGKILL)",
            Fault::OomKill => "OOM kill (memory cgroup limit)",
            Fault::Freeze => "freeze (SIGSTOP)",
            Fault::CgroupFreeze => "cgroup freeze (cgroup.freeze)",
            Fault::FdExhaustion => "descriptor exhaustion (RLIMIT_NOFILE, EMFILE)",
            Fault::Wedge => "wedged stop (SIGSTOP, SIGTERM ignored)",
            Fault::SocketRemoved => "socket file removed",
            Fault::BusRestart => "D-Bus restarted (5 s outage)",
            Fault::DaemonReexec => "systemd daemon-reexec",
            Fault::StorageStall => "storage stall (fsfreeze of containerd's root)",
            Fault::HungShim => "hung shim (SIGSTOP of one shim)",
            Fault::StartupHang => "startup hang (metadata lock held at start)",
        }
    }

    /// What is right: a restart for every fault of containerd's own process (it binds its
    /// socket anew at start, so even a removed socket file is cured by one); a report for a
    /// stall below it or in one shim; one restart then a report for a startup hang; nothing
    /// for a fault of the observer's surroundings, which containerd never noticed.
    pub fn remedy(self) -> Remedy {
        match self {
            Fault::BusRestart | Fault::DaemonReexec => Remedy::Nothing,
            Fault::StorageStall | Fault::HungShim => Remedy::Report,
            Fault::StartupHang => Remedy::OneRestartThenReport,
            _ => Remedy::Restart,
        }
    }

    /// The observer's verdicts that are right for this fault. The other bad ones are
    /// watched for too, and recorded when they come instead.
    pub fn right_verdicts(self) -> &'static [&'static str] {
        match self.remedy() {
            Remedy::Restart => &["crashed", "hung", "unreachable"],
            Remedy::Nothing => &[],
            Remedy::Report if self == Fault::StorageStall => &["storage_stalled"],
            Remedy::Report => &["degraded"],
            Remedy::OneRestartThenReport => &["startup_hung"],
        }
    }

    /// How long to watch for a verdict where no restart is the remedy (a report-only fault
    /// is held this long too, and then undone, to see that no restart comes).
    fn quiet_window(self, config: Option<Config>) -> Duration {
        match (self.remedy(), config) {
            (_, Some(Config::GardenerLike)) => Duration::from_secs(70),
            (Remedy::Nothing, _) => Duration::from_secs(15),
            _ => Duration::from_secs(30),
        }
    }

    fn sandbox_options(self) -> SandboxOptions {
        let base = match self {
            Fault::Wedge => Scenario::Wedge.sandbox_options(),
            Fault::StorageStall => SandboxOptions::new().root_on_loop_fs(256),
            _ => SandboxOptions::new(),
        };
        base.service_extra("TimeoutStopSec=90s")
    }

    /// What must exist before the fault: the container whose shim is stopped.
    fn prepare(self, sandbox: &Sandbox) -> Result<Option<Container>, String> {
        match self {
            Fault::HungShim => sandbox.run_container().map(Some).map_err(|e| e.to_string()),
            _ => Ok(None),
        }
    }

    /// Faults after which nothing can queue on containerd's listener: our own `Version()`
    /// client may ask from the start without handing the kernel sensor a stale connection.
    fn answers_early(self) -> bool {
        matches!(self, Fault::Crash | Fault::OomKill | Fault::SocketRemoved)
    }

    /// Injects the fault into `target` (containerd's process) and returns the guard that
    /// undoes it; `prepared` is what [`Fault::prepare`] made.
    fn inject(
        self,
        sandbox: &Sandbox,
        target: u32,
        prepared: Option<Container>,
    ) -> Result<Injected, String> {
        let e = |e: crate::SandboxError| e.to_string();
        Ok(match self {
            Fault::Crash => {
                signal(target, libc::SIGKILL);
                Injected::Nothing
            }
            Fault::Freeze | Fault::Wedge => {
                signal(target, libc::SIGSTOP);
                Injected::Nothing
            }
            Fault::OomKill => {
                let limit = fault::MemoryLimit::squeeze(sandbox, target, 64 << 10).map_err(e)?;
                // containerd allocates as it serves; one call of ours hurries it.
                let _ = crate::containerd_version(sandbox.socket(), Duration::from_millis(500));
                Injected::Memory(limit)
            }
            Fault::CgroupFreeze => {
                Injected::Frozen(fault::CgroupFreeze::freeze(sandbox, target).map_err(e)?)
            }
            Fault::FdExhaustion => Injected::Descriptors(
                fault::FdExhaustion::exhaust(sandbox.socket(), target, 4, 8).map_err(e)?,
            ),
            Fault::SocketRemoved => {
                Injected::Socket(fault::SocketMoved::inject(sandbox.socket(), false).map_err(e)?)
            }
            Fault::BusRestart => {
                let outage = sandbox.stop_bus().map_err(e)?;
                thread::sleep(Duration::from_secs(5));
                outage.end().map_err(e)?;
                Injected::Nothing
            }
            Fault::DaemonReexec => {
                sandbox.systemctl(&["daemon-reexec"]).map_err(e)?;
                Injected::Nothing
            }
            Fault::StorageStall => Injected::Storage(sandbox.freeze_root().map_err(e)?),
            Fault::HungShim => {
                let container = prepared.ok_or("no container to stop the shim of")?;
                let stopped = container.stop_shim().map_err(e)?;
                Injected::Shim(stopped, container)
            }
            Fault::StartupHang => Injected::Startup(sandbox.hang_startup().map_err(e)?),
        })
    }
}

/// The guard of an injected fault, held until the trial ends.
#[derive(Debug)]
#[allow(dead_code)] // Held for its Drop.
enum Injected {
    Nothing,
    Memory(fault::MemoryLimit),
    Frozen(fault::CgroupFreeze),
    Descriptors(fault::FdExhaustion),
    Socket(fault::SocketMoved),
    Storage(FrozenRoot),
    /// The shim continues first, then the container goes.
    Shim(StoppedShim, Container),
    Startup(StartupHang),
}

/// A watchdog of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Watchdog {
    /// The observer in one of its configurations.
    Observer(Config),
    /// The node-problem-detector-like reference.
    NpdLike,
}

impl Watchdog {
    pub const ALL: [Watchdog; 4] = [
        Watchdog::Observer(Config::Fused),
        Watchdog::Observer(Config::PollingOnly),
        Watchdog::Observer(Config::GardenerLike),
        Watchdog::NpdLike,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Watchdog::Observer(config) => config.label(),
            Watchdog::NpdLike => "NPD-like reference",
        }
    }

    /// The references: long periods, so they run in parallel sandboxes with fewer trials.
    pub fn is_reference(self) -> bool {
        matches!(
            self,
            Watchdog::Observer(Config::GardenerLike) | Watchdog::NpdLike
        )
    }
}

/// What one trial of one fault against one watchdog came to. Times in ms from the fault.
#[derive(Debug, Clone, Serialize)]
pub struct ZooTrial {
    pub fault: Fault,
    pub watchdog: Watchdog,
    pub trial: usize,
    /// The watchdog's verdict (`crashed`, `hung`, `unreachable`; `ListPodSandbox failed` for
    /// the NPD-like one); `None`: it never reached one.
    pub verdict: Option<String>,
    pub evidence: Vec<String>,
    pub fault_to_verdict_ms: Option<f64>,
    /// How many times it acted (restarts, or kills for the NPD-like one).
    pub actions: usize,
    /// From the fault to the first `Version()` of a new containerd; `None`: never, within
    /// the trial's window.
    pub fault_to_recovery_ms: Option<f64>,
    /// Something a reader of the table should know (who restarted it, say).
    pub note: Option<String>,
    /// A new containerd came from systemd's own `Restart=` while the watchdog did nothing:
    /// its inaction was right (the NPD-like sandbox has `Restart=always`).
    pub recovered_by_systemd: bool,
    pub error: Option<String>,
    pub wall_s: f64,
}

impl ZooTrial {
    /// A trial that measured nothing yet.
    pub fn empty(fault: Fault, watchdog: Watchdog, trial: usize) -> Self {
        ZooTrial {
            fault,
            watchdog,
            trial,
            verdict: None,
            evidence: Vec::new(),
            fault_to_verdict_ms: None,
            actions: 0,
            fault_to_recovery_ms: None,
            note: None,
            recovered_by_systemd: false,
            error: None,
            wall_s: 0.0,
        }
    }

    pub fn acted(&self) -> bool {
        self.actions > 0
    }

    /// Acting was right: it acted, once, where a restart is the remedy (or left it to
    /// systemd's own restart); once and no more for a startup hang; not at all where a
    /// report, or nothing, is.
    pub fn right(&self) -> bool {
        match self.fault.remedy() {
            Remedy::Restart => {
                self.actions == 1 || (self.actions == 0 && self.recovered_by_systemd)
            }
            Remedy::OneRestartThenReport => self.actions == 1,
            Remedy::Report | Remedy::Nothing => self.actions == 0,
        }
    }

    /// The verdict reached is one that is right for the fault (for the NPD-like watchdog,
    /// any failed check counts: it has no verdicts of its own).
    pub fn right_verdict(&self) -> bool {
        self.verdict.as_deref().is_some_and(|v| {
            self.watchdog == Watchdog::NpdLike || self.fault.right_verdicts().contains(&v)
        })
    }

    pub fn one_line(&self) -> String {
        let what = format!(
            "{} / {} #{}",
            self.fault.label(),
            self.watchdog.label(),
            self.trial + 1
        );
        if let Some(err) = &self.error {
            return format!("{what}: FAILED: {err}");
        }
        let opt = |v: Option<f64>| v.map_or("never".to_owned(), |ms| format!("{ms:.0} ms"));
        format!(
            "{what}: verdict {} after {}, {} action(s) ({}), recovered after {}{}",
            self.verdict.as_deref().unwrap_or("none"),
            opt(self.fault_to_verdict_ms),
            self.actions,
            if self.right() { "right" } else { "wrong" },
            opt(self.fault_to_recovery_ms),
            self.note
                .as_ref()
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        )
    }
}

/// Runs one trial in fresh sandboxes.
pub fn run_trial(fault: Fault, watchdog: Watchdog, trial: usize) -> ZooTrial {
    let started = Instant::now();
    let mut result = ZooTrial::empty(fault, watchdog, trial);
    let outcome = match watchdog {
        Watchdog::Observer(config) => observer_trial(&mut result, config),
        Watchdog::NpdLike => npd_trial(&mut result),
    };
    result.error = outcome.err();
    result.wall_s = started.elapsed().as_secs_f64();
    result
}

fn observer_trial(out: &mut ZooTrial, config: Config) -> Result<(), String> {
    let fault = out.fault;
    let sandbox = Sandbox::start(fault.sandbox_options()).map_err(|e| e.to_string())?;
    let mut args: Vec<&str> = config.args().to_vec();
    if fault == Fault::Wedge {
        // Its main process is a shell, which SIGUSR1 would end.
        args.push("--no-stack-dump");
    }
    args.extend(LOG_ARGS);
    let observer = Observer::spawn(&sandbox, &args).map_err(|e| e.to_string())?;
    observer
        .wait_healthy(Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let (main, target) = target_of(&sandbox, fault)?;
    let prepared = fault.prepare(&sandbox)?;
    thread::sleep(random_below(config.probe_interval(), out.trial));
    let fault_wall = SystemTime::now();
    let at = Instant::now();
    let injected = fault.inject(&sandbox, target, prepared)?;
    let restart = fault.remedy() == Remedy::Restart;
    let mut notes: Vec<String> = Vec::new();
    thread::scope(|scope| {
        let early = fault.answers_early().then(|| {
            scope.spawn(|| {
                first_answer(
                    &sandbox,
                    main,
                    at,
                    config.verdict_timeout() + RECOVERY_TIMEOUT,
                )
            })
        });
        let within = if restart {
            config.verdict_timeout()
        } else {
            fault.quiet_window(Some(config))
        };
        if let Some(verdict) = zoo_verdict(&observer, fault, fault_wall, within) {
            let verdict_at = verdict["at"].as_str().and_then(parse_rfc3339);
            out.verdict = verdict["state"].as_str().map(str::to_owned);
            out.fault_to_verdict_ms = verdict_at.map(|v| wall_ms(fault_wall, v));
            out.evidence = evidence_of(&verdict);
        }
        let answered = match early {
            Some(handle) => handle.join().map_err(|_| "the Version() client panicked")?,
            None if out.verdict.is_some() && restart => {
                first_answer(&sandbox, main, at, RECOVERY_TIMEOUT)
            }
            None => Err("no restart is the remedy".into()),
        };
        out.fault_to_recovery_ms = answered.ok().map(|d| d.as_secs_f64() * 1e3);
        Ok::<(), String>(())
    })?;
    if fault.remedy() == Remedy::OneRestartThenReport && out.verdict.is_some() {
        // The restart's start hangs too, until systemd's start timeout fails its job; the
        // hang seen again after it is reported. Held until then, to see that no second
        // restart comes.
        let _ = observer.wait_for_status("the startup hang reported", STARTUP_REPORT, |doc| {
            doc["actions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|a| a["action"] == "report_with_dump"))
        });
    }
    if !restart && fault.remedy() != Remedy::Nothing {
        // Held as long again after the verdict, to see that no restart (or no second one)
        // comes; then undone, as an operator would once it is reported.
        thread::sleep(
            fault
                .quiet_window(Some(config))
                .min(Duration::from_secs(15)),
        );
        let doc = observer.status().map_err(|e| e.to_string())?;
        notes.extend(remedy_note(&doc));
    }
    drop(injected);
    // Give a second restart every chance to happen before counting.
    let _ = observer.wait_for_status("healthy", Duration::from_secs(30), |doc| {
        doc["state"] == "healthy"
    });
    thread::sleep(Duration::from_secs(2));
    let doc = observer.status().map_err(|e| e.to_string())?;
    out.actions = doc["restarts"].as_array().map_or(0, Vec::len);
    if let Some(escalation) = doc["restarts"][0]["escalation"].as_str() {
        notes.push(escalation.to_owned());
    }
    if out.actions > 0 && !restart {
        let reasons: Vec<&str> = doc["restarts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["reason"].as_str())
            .collect();
        notes.push(format!("restarted for {}", reasons.join(", ")));
    }
    out.note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok(())
}

/// The observer's first bad verdict after the fault: a right one, or else the first wrong
/// one, within `within`.
fn zoo_verdict(
    observer: &Observer,
    fault: Fault,
    fault_wall: SystemTime,
    within: Duration,
) -> Option<Value> {
    const BAD: [&str; 6] = [
        "crashed",
        "hung",
        "unreachable",
        "storage_stalled",
        "degraded",
        "startup_hung",
    ];
    let deadline = Instant::now() + within;
    let mut wrong: Option<Value> = None;
    loop {
        if let Ok(doc) = observer.status() {
            let after = doc["verdicts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| {
                    v["at"]
                        .as_str()
                        .and_then(parse_rfc3339)
                        .is_some_and(|at| at >= fault_wall)
                });
            for v in after {
                let state = v["state"].as_str().unwrap_or_default();
                if fault.right_verdicts().contains(&state) {
                    return Some(v.clone());
                }
                if wrong.is_none() && BAD.contains(&state) {
                    wrong = Some(v.clone());
                }
            }
        }
        // A wrong verdict ends the wait for a fault whose remedy is a restart only when
        // the window is over; for the others it may still be followed by the right one.
        if Instant::now() >= deadline {
            return wrong;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What the observer did about a fault it must not restart for: its last action.
fn remedy_note(doc: &Value) -> Option<String> {
    let action = doc["actions"].as_array()?.last()?;
    Some(format!(
        "{}: {}",
        action["action"].as_str()?,
        action["result"].as_str().unwrap_or_default()
    ))
}

/// How long a startup hang's restart may take to end the same way and be reported: the
/// sandbox's start timeout (20 s), and a few probes, with room.
const STARTUP_REPORT: Duration = Duration::from_secs(90);

/// containerd's main PID, and the process the fault goes to (for the wedge, the containerd
/// under the shell that is the main process).
fn target_of(sandbox: &Sandbox, fault: Fault) -> Result<(u32, u32), String> {
    let main = sandbox
        .main_pid()
        .map_err(|e| e.to_string())?
        .ok_or("containerd's unit has no main process")?;
    let target = match fault {
        Fault::Wedge => {
            child_named(main, "containerd").ok_or("no containerd under the wedged main process")?
        }
        _ => main,
    };
    Ok((main, target))
}

fn evidence_of(verdict: &Value) -> Vec<String> {
    verdict["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["source"].as_str().map(str::to_owned))
        .collect()
}

/// NPD's settings for containerd, as the brief of the comparison gives them.
const NPD_PERIOD: Duration = Duration::from_secs(10);
const NPD_DEADLINE: Duration = Duration::from_secs(10);
const NPD_COOLDOWN: Duration = Duration::from_secs(120);
/// How long after the fault the NPD-like watchdog may take to act before it counts as never:
/// a period, a deadline and some slack.
const NPD_VERDICT_WINDOW: Duration = Duration::from_secs(30);

/// What the NPD-like watchdog did, with the wall-clock time.
#[derive(Debug, Clone)]
enum NpdEvent {
    /// A failed check, inside the cooldown: no action.
    FailedInCooldown(SystemTime, String),
    /// A failed check and the kill it led to (with `systemctl kill`'s own result).
    Killed(SystemTime, String),
}

fn npd_trial(out: &mut ZooTrial) -> Result<(), String> {
    let fault = out.fault;
    let sandbox = Sandbox::start(
        fault
            .sandbox_options()
            .restart("always")
            .service_extra("RestartSec=5"),
    )
    .map_err(|e| e.to_string())?;
    enable_cri(&sandbox)?;
    list_pod_sandbox(sandbox.socket(), Duration::from_secs(5))
        .map_err(|e| format!("ListPodSandbox does not answer on a healthy containerd: {e}"))?;
    let events = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| npd_loop(&sandbox, &events, &stop));
        let result = npd_measure(out, &sandbox, &events);
        stop.store(true, Ordering::Relaxed);
        result
    })
}

fn npd_measure(
    out: &mut ZooTrial,
    sandbox: &Sandbox,
    events: &Mutex<Vec<NpdEvent>>,
) -> Result<(), String> {
    let fault = out.fault;
    // A node's containerd has run for longer than the cooldown; the fault lands at a random
    // phase of the check period.
    let up = unit_uptime(sandbox).ok_or("the unit has no start time")?;
    let prepared = fault.prepare(sandbox)?;
    thread::sleep(NPD_COOLDOWN.saturating_sub(up) + random_below(NPD_PERIOD, out.trial));
    let (main, target) = target_of(sandbox, fault)?;
    let fault_wall = SystemTime::now();
    let at = Instant::now();
    let _injected = fault.inject(sandbox, target, prepared)?;
    let restart = fault.remedy() == Remedy::Restart;
    let answered = if fault.answers_early() {
        first_answer(sandbox, main, at, NPD_VERDICT_WINDOW + RECOVERY_TIMEOUT).ok()
    } else {
        None
    };
    // The verdict: the first failed check after the fault (it also acts, outside cooldown).
    let deadline = at + NPD_VERDICT_WINDOW;
    let first_failure = loop {
        let found = events
            .lock()
            .map_err(|_| "the NPD-like loop panicked")?
            .iter()
            .find_map(|event| match event {
                NpdEvent::Killed(t, _) | NpdEvent::FailedInCooldown(t, _) if *t >= fault_wall => {
                    Some(*t)
                }
                _ => None,
            });
        if found.is_some() || Instant::now() >= deadline {
            break found;
        }
        thread::sleep(Duration::from_millis(50));
    };
    if let Some(t) = first_failure {
        out.verdict = Some("ListPodSandbox failed".into());
        out.evidence = vec!["ListPodSandbox".into()];
        out.fault_to_verdict_ms = Some(wall_ms(fault_wall, t));
    }
    let answered = match answered {
        Some(at) => Some(at),
        None if first_failure.is_some() && restart => {
            first_answer(sandbox, main, at, RECOVERY_TIMEOUT).ok()
        }
        None => None,
    };
    if fault == Fault::StartupHang {
        // Its cooldown counts from the start that hangs: watch it end, and four checks more.
        thread::sleep((NPD_COOLDOWN + NPD_PERIOD * 4).saturating_sub(at.elapsed()));
    } else if !restart {
        // Where no restart (or no second one) is right, watch what it does a while longer:
        // four more checks.
        thread::sleep(NPD_PERIOD * 4);
    }
    out.fault_to_recovery_ms = answered.map(|d| d.as_secs_f64() * 1e3);
    let events = events.lock().map_err(|_| "the NPD-like loop panicked")?;
    let kills: Vec<&String> = events
        .iter()
        .filter_map(|event| match event {
            NpdEvent::Killed(t, how) if *t >= fault_wall => Some(how),
            _ => None,
        })
        .collect();
    out.actions = kills.len();
    let mut notes = Vec::new();
    if let Some(how) = kills.first() {
        notes.push(format!("first kill: {how}"));
    }
    if let Some(err) = events.iter().find_map(|e| match e {
        NpdEvent::FailedInCooldown(t, err) if *t >= fault_wall => Some(err),
        _ => None,
    }) {
        notes.push(format!(
            "a check failed within the cooldown, no action ({err})"
        ));
    }
    if kills.len() > 1 {
        notes.push(format!("{} kills", kills.len()));
    }
    if out.fault_to_recovery_ms.is_some() {
        out.recovered_by_systemd = kills.is_empty();
        notes.push("the new containerd is systemd's (Restart=always, RestartSec=5)".into());
    }
    out.note = (!notes.is_empty()).then(|| notes.join("; "));
    Ok(())
}

/// The NPD-like loop: a check every period until `stop`.
fn npd_loop(sandbox: &Sandbox, events: &Mutex<Vec<NpdEvent>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let began = Instant::now();
        if let Err(err) = list_pod_sandbox(sandbox.socket(), NPD_DEADLINE) {
            let at = SystemTime::now();
            let event = if unit_uptime(sandbox).is_some_and(|up| up >= NPD_COOLDOWN) {
                let how = match sandbox.systemctl(&["kill", "--kill-who=main", sandbox.unit()]) {
                    Ok(_) => format!(
                        "ListPodSandbox failed ({err}); systemctl kill --kill-who=main sent SIGTERM"
                    ),
                    Err(e) => format!("ListPodSandbox failed ({err}); systemctl kill failed: {e}"),
                };
                NpdEvent::Killed(at, how)
            } else {
                NpdEvent::FailedInCooldown(at, err.to_string())
            };
            if let Ok(mut events) = events.lock() {
                events.push(event);
            }
        }
        // The next check a period after this one began, in short naps so `stop` is heard.
        while began.elapsed() < NPD_PERIOD && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How long since systemd last started the unit: from its `InactiveExitTimestampMonotonic`,
/// the uptime NPD's cooldown counts from (its health checker reads `InactiveExitTimestamp`,
/// set when the unit leaves inactive for activating, so that a unit killed while still
/// activating is not killed again at once).
fn unit_uptime(sandbox: &Sandbox) -> Option<Duration> {
    let out = sandbox
        .systemctl(&[
            "show",
            "-p",
            "InactiveExitTimestampMonotonic",
            "--value",
            sandbox.unit(),
        ])
        .ok()?;
    let entered = Duration::from_micros(out.trim().parse::<u64>().ok().filter(|us| *us > 0)?);
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) } != 0 {
        return None;
    }
    let now = Duration::new(now.tv_sec as u64, now.tv_nsec as u32);
    Some(now.saturating_sub(entered))
}

/// Loads containerd's CRI plugin where the sandbox's config disables it, and has the unit
/// restarted once (the sandbox's `Restart=always`): `ListPodSandbox` needs it. (A no-op where the harness loads it already.)
fn enable_cri(sandbox: &Sandbox) -> Result<(), String> {
    let path = sandbox.dir().join("containerd/config.toml");
    let config = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let disabled = "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";
    if !config.contains(disabled) {
        return Ok(());
    }
    fs::write(&path, config.replace(disabled, ""))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let old = sandbox.main_pid().map_err(|e| e.to_string())?;
    // Killed, not stopped: a stop of the wedged unit would hang for TimeoutStopSec. Its
    // `Restart=always` starts it again.
    sandbox
        .systemctl(&["kill", "--signal=SIGKILL", sandbox.unit()])
        .map_err(|e| e.to_string())?;
    sandbox
        .wait_for_pid(old, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The trials of one fault and one watchdog, summarised. Times in ms.
#[derive(Debug, Clone, Serialize)]
pub struct ZooRow {
    pub fault: Fault,
    pub watchdog: Watchdog,
    pub trials: usize,
    pub failed: usize,
    /// Trials that never reached a verdict.
    pub never_verdict: usize,
    pub fault_to_verdict_ms: Option<Summary>,
    /// Trials in which it acted, and in which acting was right.
    pub acted: usize,
    pub right: usize,
    /// The most actions of one trial (a storm shows here).
    pub most_actions: usize,
    /// Trials whose verdict was not a right one for the fault.
    pub wrong_verdicts: usize,
    /// Trials in which no new containerd answered within the window.
    pub never_recovered: usize,
    pub fault_to_recovery_ms: Option<Summary>,
    pub verdicts: Vec<String>,
    pub notes: Vec<String>,
}

pub fn summarize_zoo(trials: &[ZooTrial]) -> Vec<ZooRow> {
    let mut rows = Vec::new();
    for fault in Fault::ALL {
        for watchdog in Watchdog::ALL {
            let all: Vec<&ZooTrial> = trials
                .iter()
                .filter(|t| t.fault == fault && t.watchdog == watchdog)
                .collect();
            if all.is_empty() {
                continue;
            }
            let done: Vec<&&ZooTrial> = all.iter().filter(|t| t.error.is_none()).collect();
            let values = |f: fn(&ZooTrial) -> Option<f64>| {
                summarize(&done.iter().filter_map(|t| f(t)).collect::<Vec<_>>())
            };
            let mut verdicts: Vec<String> = Vec::new();
            let mut notes: Vec<String> = Vec::new();
            for t in &done {
                let v = match &t.verdict {
                    Some(v) => format!("{v} ({})", t.evidence.join("+")),
                    None => "never".into(),
                };
                if !verdicts.contains(&v) {
                    verdicts.push(v);
                }
                if let Some(n) = &t.note
                    && !notes.contains(n)
                {
                    notes.push(n.clone());
                }
            }
            rows.push(ZooRow {
                fault,
                watchdog,
                trials: all.len(),
                failed: all.len() - done.len(),
                never_verdict: done.iter().filter(|t| t.verdict.is_none()).count(),
                fault_to_verdict_ms: values(|t| t.fault_to_verdict_ms),
                acted: done.iter().filter(|t| t.acted()).count(),
                right: done.iter().filter(|t| t.right()).count(),
                most_actions: done.iter().map(|t| t.actions).max().unwrap_or(0),
                wrong_verdicts: done
                    .iter()
                    .filter(|t| t.verdict.is_some() && !t.right_verdict())
                    .count(),
                never_recovered: done
                    .iter()
                    .filter(|t| t.fault_to_recovery_ms.is_none())
                    .count(),
                fault_to_recovery_ms: values(|t| t.fault_to_recovery_ms),
                verdicts,
                notes,
            });
        }
    }
    rows
}
