//! Recovery trials: a fault injected into a fresh sandbox, timed on this process's clock.
//!
//! Every trial starts its own sandbox and observer, so the restart budget's back-off never
//! carries from one trial to the next. After the observer is healthy the trial waits a random
//! part of a probe interval, so faults land at every phase of the probe timer (a fault just
//! after a probe is the worst case for polling). Two figures per trial:
//! - fault to verdict: from the signal to the `at` of the observer's crashed, hung or
//!   unreachable verdict (the observer's own `detection_latency_ms`, which counts from the
//!   first sign it saw, is kept too);
//! - fault to answer: from the signal to the first `Version()` a new containerd answers, by
//!   our own client. For a freeze or a wedge that client starts only once the verdict is
//!   out: its connections would otherwise queue on the frozen listener and hand the kernel
//!   sensor an earlier pending connection than the agent's own heartbeat.

use std::{
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use serde_json::Value;

use super::{Summary, parse_rfc3339, summarize, wall_ms};
use crate::{Observer, Sandbox, SandboxOptions, grpc::containerd_version, process, signal};

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// `SIGKILL` of containerd.
    Crash,
    /// `SIGSTOP` of containerd.
    Freeze,
    /// `SIGSTOP` of containerd under a main process that ignores `SIGTERM`: the stop hangs
    /// until `TimeoutStopSec` (90 s) unless the observer kills the main process.
    Wedge,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::Crash, Scenario::Freeze, Scenario::Wedge];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Crash => "crash (SIGKILL)",
            Scenario::Freeze => "freeze (SIGSTOP)",
            Scenario::Wedge => "wedged stop (SIGSTOP, SIGTERM ignored)",
        }
    }

    fn signal(self) -> i32 {
        match self {
            Scenario::Crash => libc::SIGKILL,
            Scenario::Freeze | Scenario::Wedge => libc::SIGSTOP,
        }
    }

    /// The unit: `Restart=no` so every restart is the observer's; for the wedge, a shell
    /// that traps `TERM` runs containerd as its child.
    pub(crate) fn sandbox_options(self) -> SandboxOptions {
        match self {
            Scenario::Crash | Scenario::Freeze => SandboxOptions::new(),
            Scenario::Wedge => {
                let containerd = process::find_on_path("containerd")
                    .unwrap_or_else(|| PathBuf::from("/usr/bin/containerd"));
                SandboxOptions::new()
                    .exec_start(&format!(
                        "/bin/sh -c 'trap \"\" TERM; {} --config {{dir}}/containerd/config.toml & while :; do sleep 1; done'",
                        containerd.display()
                    ))
                    .service_extra("NotifyAccess=all\nKillMode=control-group\nTimeoutStopSec=90s")
            }
        }
    }

    /// Flags the scenario needs on top of the configuration's.
    pub fn observer_args(self) -> &'static [&'static str] {
        match self {
            Scenario::Crash | Scenario::Freeze => &[],
            Scenario::Wedge => &["--kill-grace", "2s", "--no-stack-dump"],
        }
    }
}

/// How the observer is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Config {
    /// The default: kernel sensors and probes.
    Fused,
    /// `--no-ebpf`: probes alone, the same probe settings.
    PollingOnly,
    /// Like Gardener's node agent: a probe every 30 s, restart after about 60 s of failure.
    GardenerLike,
}

impl Config {
    pub fn label(self) -> &'static str {
        match self {
            Config::Fused => "fused (default)",
            Config::PollingOnly => "polling-only",
            Config::GardenerLike => "Gardener-like reference",
        }
    }

    pub fn args(self) -> &'static [&'static str] {
        match self {
            Config::Fused => &[],
            Config::PollingOnly => &["--no-ebpf"],
            // Gardener's agent calls `Version()` and nothing else: no deeper layer, and no
            // D-state sampling (a threshold no stall reaches).
            Config::GardenerLike => &[
                "--no-ebpf",
                "--probe-interval",
                "30s",
                "--probe-timeout",
                "29s",
                "--failures-to-hang",
                "2",
                "--probes",
                "version",
                "--blocked-threshold",
                "24h",
            ],
        }
    }

    pub(crate) fn probe_interval(self) -> Duration {
        match self {
            Config::Fused | Config::PollingOnly => Duration::from_secs(2),
            Config::GardenerLike => Duration::from_secs(30),
        }
    }

    /// How long a verdict may take before the trial counts as failed.
    pub(crate) fn verdict_timeout(self) -> Duration {
        match self {
            Config::Fused | Config::PollingOnly => Duration::from_secs(30),
            Config::GardenerLike => Duration::from_secs(150),
        }
    }

    /// How often the trial reads `/status` while it waits for the verdict.
    pub(crate) fn status_poll(self) -> Duration {
        match self {
            Config::Fused | Config::PollingOnly => Duration::from_millis(10),
            Config::GardenerLike => Duration::from_millis(100),
        }
    }
}

/// Every observer of the benchmarks logs at the agent's default level: debug logging would
/// cost CPU that a node does not pay.
pub(crate) const LOG_ARGS: [&str; 2] = ["--log-level", "info"];

/// How long a restart, from the verdict to a new containerd answering, may take.
pub(crate) const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// One trial.
#[derive(Debug, Clone, Serialize)]
pub struct TrialResult {
    pub scenario: Scenario,
    pub config: Config,
    pub trial: usize,
    pub times: Option<TrialTimes>,
    pub error: Option<String>,
    pub wall_s: f64,
}

/// What one trial measured. Times in ms from the fault.
#[derive(Debug, Clone, Serialize)]
pub struct TrialTimes {
    /// How long after a probe tick (the observer's start) the fault came.
    pub phase_ms: f64,
    /// `crashed`, `hung` or `unreachable`.
    pub verdict: String,
    pub fault_to_verdict_ms: f64,
    /// The observer's own figure: from the first sign it saw to the verdict.
    pub detection_latency_ms: f64,
    /// Sources of the verdict's evidence (`ebpf`, `probe`, ...).
    pub evidence: Vec<String>,
    /// Our own `Version()` client's first answer from the new containerd.
    pub fault_to_answer_ms: f64,
    /// The observer's healthy verdict after the restart.
    pub fault_to_healthy_ms: Option<f64>,
    /// The restart as the observer recorded it: from its start to systemd's job result.
    pub restart_ms: Option<f64>,
    pub killed_main: bool,
}

impl TrialResult {
    /// For a trial whose thread panicked.
    pub(crate) fn panicked() -> Self {
        TrialResult {
            scenario: Scenario::Crash,
            config: Config::GardenerLike,
            trial: usize::MAX,
            times: None,
            error: Some("the trial's thread panicked".into()),
            wall_s: 0.0,
        }
    }

    pub fn one_line(&self) -> String {
        let what = format!(
            "{} / {} #{}",
            self.scenario.label(),
            self.config.label(),
            self.trial + 1
        );
        match (&self.times, &self.error) {
            (Some(t), _) => format!(
                "{what}: {} after {:.0} ms (evidence {}), answered after {:.0} ms (restart {:.0} ms){}",
                t.verdict,
                t.fault_to_verdict_ms,
                t.evidence.join("+"),
                t.fault_to_answer_ms,
                t.restart_ms.unwrap_or(f64::NAN),
                if t.killed_main {
                    ", main process killed"
                } else {
                    ""
                }
            ),
            (None, Some(err)) => format!("{what}: FAILED: {err}"),
            (None, None) => format!("{what}: no result"),
        }
    }
}

/// Runs one trial in a fresh sandbox.
pub fn run_trial(scenario: Scenario, config: Config, trial: usize) -> TrialResult {
    let started = Instant::now();
    let outcome = measure(scenario, config, trial);
    TrialResult {
        scenario,
        config,
        trial,
        wall_s: started.elapsed().as_secs_f64(),
        error: outcome.as_ref().err().cloned(),
        times: outcome.ok(),
    }
}

fn measure(scenario: Scenario, config: Config, trial: usize) -> Result<TrialTimes, String> {
    let sandbox = Sandbox::start(scenario.sandbox_options()).map_err(|e| e.to_string())?;
    let mut args: Vec<&str> = config.args().to_vec();
    args.extend(scenario.observer_args());
    args.extend(LOG_ARGS);
    let observer = Observer::spawn(&sandbox, &args).map_err(|e| e.to_string())?;
    observer
        .wait_healthy(Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let healthy_at = Instant::now();
    let main = sandbox
        .main_pid()
        .map_err(|e| e.to_string())?
        .ok_or("containerd's unit has no main process")?;
    let target = match scenario {
        Scenario::Wedge => {
            child_named(main, "containerd").ok_or("no containerd under the wedged main process")?
        }
        _ => main,
    };

    thread::sleep(random_below(config.probe_interval(), trial));
    let phase =
        healthy_at.elapsed().as_secs_f64() * 1e3 % config.probe_interval().as_millis() as f64;
    let fault_wall = SystemTime::now();
    let fault = Instant::now();
    signal(target, scenario.signal());

    thread::scope(|scope| {
        // After a crash nothing can queue on the dead listener: ask from the start.
        let early = (scenario == Scenario::Crash).then(|| {
            scope.spawn(|| {
                let within = config.verdict_timeout() + RECOVERY_TIMEOUT;
                first_answer(&sandbox, main, fault, within)
            })
        });
        let verdict = wait_for_verdict(&observer, fault_wall, config, config.verdict_timeout())?;
        let answered = match early {
            Some(handle) => handle.join().map_err(|_| "the Version() client panicked")?,
            None => first_answer(&sandbox, main, fault, RECOVERY_TIMEOUT),
        }?;
        let doc = observer
            .wait_for_status(
                "healthy after the restart",
                Duration::from_secs(30),
                |doc| {
                    doc["state"] == "healthy"
                        && doc["restarts"].as_array().is_some_and(|r| !r.is_empty())
                },
            )
            .map_err(|e| e.to_string())?;
        let verdict_at = parse_rfc3339(verdict["at"].as_str().unwrap_or_default())
            .ok_or_else(|| format!("a verdict without a readable time: {verdict}"))?;
        let restart = doc["restarts"].as_array().and_then(|r| r.last()).cloned();
        let healthy = doc["verdicts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["state"] == "healthy")
            .filter_map(|v| parse_rfc3339(v["at"].as_str()?))
            .find(|at| *at > verdict_at);
        Ok(TrialTimes {
            phase_ms: phase,
            verdict: verdict["state"].as_str().unwrap_or_default().to_owned(),
            fault_to_verdict_ms: wall_ms(fault_wall, verdict_at),
            detection_latency_ms: verdict["detection_latency_ms"].as_f64().unwrap_or(f64::NAN),
            evidence: verdict["evidence"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["source"].as_str().map(str::to_owned))
                .collect(),
            fault_to_answer_ms: answered.as_secs_f64() * 1e3,
            fault_to_healthy_ms: healthy.map(|at| wall_ms(fault_wall, at)),
            restart_ms: restart.as_ref().and_then(|r| r["duration_ms"].as_f64()),
            killed_main: restart.is_some_and(|r| r["killed_main"] == true),
        })
    })
}

/// Reads `/status` until a crashed, hung or unreachable verdict from after the fault.
pub(crate) fn wait_for_verdict(
    observer: &Observer,
    fault_wall: SystemTime,
    config: Config,
    within: Duration,
) -> Result<Value, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(doc) = observer.status() {
            let found = doc["verdicts"].as_array().into_iter().flatten().find(|v| {
                ["crashed", "hung", "unreachable"].contains(&v["state"].as_str().unwrap_or(""))
                    && v["at"]
                        .as_str()
                        .and_then(parse_rfc3339)
                        .is_some_and(|at| at >= fault_wall)
            });
            if let Some(verdict) = found {
                return Ok(verdict.clone());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no verdict within {within:?} of the fault; last state {}",
                    doc["state"]
                ));
            }
        } else if Instant::now() >= deadline {
            return Err("the observer's /status did not answer".into());
        }
        thread::sleep(config.status_poll());
    }
}

/// Time from `fault` to the first `Version()` answered by a containerd of a new main process,
/// waiting up to `within` from now.
pub(crate) fn first_answer(
    sandbox: &Sandbox,
    old_main: u32,
    fault: Instant,
    within: Duration,
) -> Result<Duration, String> {
    let deadline = Instant::now() + within;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        match containerd_version(sandbox.socket(), Duration::from_secs(1)) {
            Ok(_) => {
                let at = fault.elapsed();
                // systemd forked the new main process before it could answer, so a changed
                // MainPID tells the new containerd from a thawed old one.
                match sandbox.main_pid() {
                    Ok(Some(pid)) if pid != old_main => return Ok(at),
                    _ => thread::sleep(Duration::from_millis(5)),
                }
            }
            Err(err) => {
                last_error = err.to_string();
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
    Err(format!(
        "no new containerd answered Version() within {within:?} (last error: {last_error})"
    ))
}

/// The first child of `parent` whose command is `comm`.
pub(crate) fn child_named(parent: u32, comm: &str) -> Option<u32> {
    let children = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|p| fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
}

/// A pseudo-random duration in `[0, below)`: seeded by the clock and the trial number.
pub(crate) fn random_below(below: Duration, trial: usize) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    // splitmix64
    let mut z = nanos ^ (trial as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    below.mul_f64((z >> 11) as f64 / (1u64 << 53) as f64)
}

/// The trials of one scenario and configuration, summarised. Times in ms.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryRow {
    pub scenario: Scenario,
    pub config: Config,
    pub trials: usize,
    pub failed: usize,
    pub fault_to_verdict_ms: Option<Summary>,
    pub detection_latency_ms: Option<Summary>,
    pub fault_to_answer_ms: Option<Summary>,
    pub restart_ms: Option<Summary>,
    /// Verdicts reached, e.g. `hung (ebpf+probe)`, with how often.
    pub verdicts: Vec<(String, usize)>,
}

pub fn summarize_trials(trials: &[TrialResult]) -> Vec<RecoveryRow> {
    let mut rows = Vec::new();
    for scenario in Scenario::ALL {
        for config in [Config::Fused, Config::PollingOnly, Config::GardenerLike] {
            let these: Vec<&TrialResult> = trials
                .iter()
                .filter(|t| t.scenario == scenario && t.config == config && t.trial != usize::MAX)
                .collect();
            if these.is_empty() {
                continue;
            }
            let times: Vec<&TrialTimes> = these.iter().filter_map(|t| t.times.as_ref()).collect();
            let of = |f: fn(&TrialTimes) -> Option<f64>| {
                summarize(&times.iter().filter_map(|t| f(t)).collect::<Vec<_>>())
            };
            let mut verdicts: Vec<(String, usize)> = Vec::new();
            for t in &times {
                let name = format!("{} ({})", t.verdict, t.evidence.join("+"));
                match verdicts.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, count)) => *count += 1,
                    None => verdicts.push((name, 1)),
                }
            }
            rows.push(RecoveryRow {
                scenario,
                config,
                trials: these.len(),
                failed: these.len() - times.len(),
                fault_to_verdict_ms: of(|t| Some(t.fault_to_verdict_ms)),
                detection_latency_ms: of(|t| Some(t.detection_latency_ms)),
                fault_to_answer_ms: of(|t| Some(t.fault_to_answer_ms)),
                restart_ms: of(|t| t.restart_ms),
                verdicts,
            });
        }
    }
    rows
}

/// How much slower a configuration is than fused, on medians.
#[derive(Debug, Clone, Serialize)]
pub struct RatioRow {
    pub scenario: Scenario,
    /// The configuration compared with fused.
    pub config: Config,
    pub verdict_ratio: Option<f64>,
    pub answer_ratio: Option<f64>,
}

pub fn ratios(rows: &[RecoveryRow]) -> Vec<RatioRow> {
    let median = |scenario, config, f: fn(&RecoveryRow) -> Option<Summary>| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.config == config)
            .and_then(f)
            .map(|s| s.median)
    };
    let mut out = Vec::new();
    for scenario in Scenario::ALL {
        for config in [Config::PollingOnly, Config::GardenerLike] {
            let ratio = |f: fn(&RecoveryRow) -> Option<Summary>| {
                let (other, fused) = (
                    median(scenario, config, f)?,
                    median(scenario, Config::Fused, f)?,
                );
                (fused > 0.0).then(|| other / fused)
            };
            let row = RatioRow {
                scenario,
                config,
                verdict_ratio: ratio(|r| r.fault_to_verdict_ms),
                answer_ratio: ratio(|r| r.fault_to_answer_ms),
            };
            if row.verdict_ratio.is_some() || row.answer_ratio.is_some() {
                out.push(row);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_phases_stay_below_the_interval() {
        for trial in 0..100 {
            assert!(random_below(Duration::from_secs(2), trial) < Duration::from_secs(2));
        }
    }
}
