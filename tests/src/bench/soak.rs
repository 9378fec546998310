//! The soak: containerd kept alive but slow (its CPU capped by the cgroup CPU controller)
//! while the node is loaded (CPU hogs on every core, a paced connection storm against
//! containerd's socket, steady `Version()` calls), watched by the agent in its default fused
//! mode. It passes when the agent restarts nothing and its memory stays flat.
//!
//! The cap must leave containerd slow but alive: a `Version()` answer within the probe's
//! deadline. A containerd that misses the deadline while its accept queue holds a
//! connection older than the stall threshold is hung by the detector's rules, and a restart
//! is then the right call, not a false one.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    Summary,
    load::{CpuHogs, Storm, StormSpec, StormStats},
    procfs,
    recovery::LOG_ARGS,
    secs, summarize,
};
use crate::{Observer, Sandbox, SandboxOptions};

/// What a soak does.
#[derive(Debug, Clone, Serialize)]
pub struct SoakPlan {
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// containerd's CPU cap, in percent of one CPU.
    pub cpu_quota_percent: u32,
    /// Threads spinning on the CPUs.
    pub hogs: usize,
    pub storm: StormSpec,
    /// How often the agent's status and memory are read.
    #[serde(serialize_with = "secs")]
    pub sample_every: Duration,
    /// Allowed growth of the agent's VmRSS from the start to the end, in MiB; the larger
    /// of this and `memory_tolerance_percent` applies.
    pub memory_tolerance_mib: f64,
    pub memory_tolerance_percent: f64,
}

impl SoakPlan {
    pub fn new(duration: Duration, cpu_quota_percent: u32) -> Self {
        SoakPlan {
            duration,
            cpu_quota_percent,
            hogs: thread::available_parallelism().map_or(2, std::num::NonZero::get),
            storm: StormSpec {
                connect_threads: 1,
                connect_rate: Some(200),
                version_threads: 1,
                version_interval: Some(Duration::from_millis(100)),
                version_timeout: Some(Duration::from_secs(5)),
            },
            sample_every: Duration::from_secs(1),
            memory_tolerance_mib: 2.0,
            memory_tolerance_percent: 10.0,
        }
    }
}

/// What a soak saw.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub plan: SoakPlan,
    pub seconds: f64,
    /// How containerd's CPU was capped.
    pub throttle: String,
    /// containerd's own CPU use over the soak, in percent of one CPU.
    pub containerd_cpu_percent: f64,
    /// Periods in which the cap stopped containerd, of all periods (cgroup `cpu.stat`).
    pub throttled_periods: Option<(u64, u64)>,
    /// Every verdict reached during the soak, `state (evidence)`, with how often.
    pub verdicts: Vec<(String, usize)>,
    pub restarts: usize,
    /// containerd's main PID at the end differs from the start.
    pub main_pid_changed: bool,
    pub max_pending_age_ms: f64,
    /// Samples in which the agent reported a connection pending for longer than the stall
    /// threshold while the kernel's accept queue of the socket (`ss -xl`, Recv-Q) was empty:
    /// a pending connection that is not there.
    pub phantom_pending_samples: usize,
    /// Samples in which the agent reported a connection pending for longer than the stall
    /// threshold.
    pub stalled_samples: usize,
    /// The agent's own probes, as `/status` reported them.
    pub probe_latency_ms: Option<Summary>,
    pub probes: usize,
    pub probe_failures: usize,
    pub storm: StormStats,
    /// The agent's VmRSS: mean over the first and the last tenth of the soak, in MiB.
    pub rss_start_mib: f64,
    pub rss_end_mib: f64,
    pub hwm_mib: f64,
    /// `(seconds since start, VmRSS MiB)`, one per sample.
    pub memory_series: Vec<(f64, f64)>,
    pub failures: Vec<String>,
    pub passed: bool,
}

/// Runs a soak; `progress` gets a line about once a minute.
pub fn run(plan: &SoakPlan, progress: &mut dyn FnMut(&str)) -> Result<SoakReport, String> {
    let sandbox = Sandbox::start(SandboxOptions::new()).map_err(|e| e.to_string())?;
    let mut args = Vec::new();
    args.extend(LOG_ARGS);
    let observer = Observer::spawn(&sandbox, &args).map_err(|e| e.to_string())?;
    let doc = observer
        .wait_healthy(Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let agent = doc["observer"]["pid"]
        .as_u64()
        .ok_or("/status has no observer.pid")? as u32;
    let containerd = sandbox
        .main_pid()
        .map_err(|e| e.to_string())?
        .ok_or("containerd's unit has no main process")?;
    let throttle = Throttle::apply(&sandbox, containerd, plan.cpu_quota_percent)?;
    progress(&format!(
        "containerd (pid {containerd}) capped: {}",
        throttle.how
    ));
    let throttled_before = throttle.periods();
    let containerd_before = procfs::sample(containerd).map_err(|e| e.to_string())?;

    let hogs = CpuHogs::start(plan.hogs);
    let storm = Storm::start(sandbox.socket(), &plan.storm);
    let started = Instant::now();
    let mut seen_verdicts: HashSet<String> = HashSet::new();
    let mut verdicts: Vec<(String, usize)> = Vec::new();
    let mut seen_probes: HashSet<String> = HashSet::new();
    let (mut probe_ms, mut probe_failures) = (Vec::new(), 0usize);
    let (mut max_pending, mut restarts, mut hwm_kib) = (0f64, 0usize, 0u64);
    let mut memory_series = Vec::new();
    let mut next_report = Duration::from_secs(60);
    let mut status_errors = 0usize;
    let (mut stalled_samples, mut phantom_samples) = (0usize, 0usize);
    for verdict in doc["verdicts"].as_array().into_iter().flatten() {
        seen_verdicts.insert(verdict["at"].to_string());
    }

    while started.elapsed() < plan.duration {
        thread::sleep(plan.sample_every);
        let elapsed = started.elapsed();
        if let Ok(mem) = procfs::sample(agent) {
            memory_series.push((elapsed.as_secs_f64(), mem.rss_kib as f64 / 1024.0));
            hwm_kib = hwm_kib.max(mem.hwm_kib);
        }
        let Ok(doc) = observer.status() else {
            status_errors += 1;
            continue;
        };
        for verdict in doc["verdicts"].as_array().into_iter().flatten() {
            if !seen_verdicts.insert(verdict["at"].to_string()) {
                continue;
            }
            let sources: Vec<&str> = verdict["evidence"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["source"].as_str())
                .collect();
            let name = format!(
                "{} ({})",
                verdict["state"].as_str().unwrap_or("?"),
                sources.join("+")
            );
            if verdict["state"] != "healthy" {
                progress(&format!(
                    "  {:.0} s: verdict {name}: {}",
                    elapsed.as_secs_f64(),
                    verdict["evidence"]
                ));
            }
            match verdicts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, count)) => *count += 1,
                None => verdicts.push((name, 1)),
            }
        }
        let probe = &doc["last_probe"];
        if let Some(at) = probe["at"].as_str()
            && seen_probes.insert(at.to_owned())
        {
            if probe["result"] == "ok" {
                probe_ms.push(probe["latency_ms"].as_f64().unwrap_or(f64::NAN));
            } else {
                probe_failures += 1;
            }
        }
        let oldest = doc["pending_connections"]["oldest_age_ms"]
            .as_f64()
            .unwrap_or(0.0);
        max_pending = max_pending.max(oldest);
        if oldest > STALL_THRESHOLD_MS {
            stalled_samples += 1;
            if accept_queue_len(sandbox.socket()) == Some(0) {
                phantom_samples += 1;
            }
        }
        restarts = doc["restarts"].as_array().map_or(0, Vec::len);
        if elapsed >= next_report {
            next_report += Duration::from_secs(60);
            let p = summarize(&probe_ms);
            progress(&format!(
                "{:>4.0} s: {}, VmRSS {:.1} MiB, probes p50 {:.1} ms p99 {:.1} ms max {:.1} ms, {probe_failures} failed, oldest pending {oldest:.0} ms now and {max_pending:.0} ms at most ({phantom_samples} sample(s) with an empty kernel queue), {restarts} restart(s)",
                elapsed.as_secs_f64(),
                doc["state"].as_str().unwrap_or("?"),
                memory_series.last().map_or(f64::NAN, |m| m.1),
                p.map_or(f64::NAN, |s| s.median),
                p.map_or(f64::NAN, |s| s.p99),
                p.map_or(f64::NAN, |s| s.max),
            ));
        }
    }
    let storm = storm.stop();
    drop(hogs);
    let seconds = started.elapsed().as_secs_f64();
    let containerd_after = procfs::sample(containerd).ok();
    let throttled_periods = match (throttled_before, throttle.periods()) {
        (Some((p0, t0)), Some((p1, t1))) => Some((p1.saturating_sub(p0), t1.saturating_sub(t0))),
        _ => None,
    };
    let main_now = sandbox.main_pid().ok().flatten();

    let tenth = (memory_series.len() / 10).max(1);
    let mean = |s: &[(f64, f64)]| s.iter().map(|m| m.1).sum::<f64>() / s.len().max(1) as f64;
    let rss_start = mean(&memory_series[..tenth.min(memory_series.len())]);
    let rss_end = mean(&memory_series[memory_series.len().saturating_sub(tenth)..]);
    let allowed = plan
        .memory_tolerance_mib
        .max(rss_start * plan.memory_tolerance_percent / 100.0);

    let mut failures = Vec::new();
    if restarts > 0 {
        failures.push(format!(
            "the observer restarted containerd {restarts} time(s)"
        ));
    }
    if main_now != Some(containerd) {
        failures.push(format!(
            "containerd's main PID changed from {containerd} to {main_now:?}"
        ));
    }
    if memory_series.is_empty() {
        failures.push("the agent's memory could not be read".into());
    } else if rss_end - rss_start > allowed {
        failures.push(format!(
            "the agent's VmRSS grew from {rss_start:.1} MiB to {rss_end:.1} MiB, more than the {allowed:.1} MiB allowed"
        ));
    }
    if probe_ms.is_empty() {
        failures.push("no probe of the agent was seen".into());
    }
    if status_errors * 10 > memory_series.len().max(1) {
        failures.push(format!(
            "the agent's /status did not answer {status_errors} time(s)"
        ));
    }
    Ok(SoakReport {
        plan: plan.clone(),
        seconds,
        throttle: throttle.how.clone(),
        containerd_cpu_percent: containerd_after.map_or(f64::NAN, |after| {
            procfs::cpu_percent(&containerd_before, &after)
        }),
        throttled_periods,
        verdicts,
        restarts,
        main_pid_changed: main_now != Some(containerd),
        max_pending_age_ms: max_pending,
        phantom_pending_samples: phantom_samples,
        stalled_samples,
        probe_latency_ms: summarize(&probe_ms),
        probes: probe_ms.len() + probe_failures,
        probe_failures,
        storm,
        rss_start_mib: rss_start,
        rss_end_mib: rss_end,
        hwm_mib: hwm_kib as f64 / 1024.0,
        memory_series,
        passed: failures.is_empty(),
        failures,
    })
}

/// The agent's default `--stall-threshold`, in ms.
const STALL_THRESHOLD_MS: f64 = 1000.0;

/// Connections waiting in the accept queue of the listening socket at `path`: Recv-Q of
/// `ss -xlH`. `None` when ss is missing or does not list the socket.
fn accept_queue_len(path: &Path) -> Option<u64> {
    let out = Command::new("ss").arg("-xlH").output().ok()?;
    let path = path.to_str()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            // u_str LISTEN <Recv-Q> <Send-Q> <path> <inode> * 0
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(4) == Some(&path)).then(|| fields.get(2)?.parse().ok())?
        })
}

/// containerd's CPU cap. On a cgroup v1 host it is a cgroup named after the sandbox in the
/// `cpu` hierarchy (systemd keeps tracking the unit in its own hierarchy, and the sandbox's
/// teardown removes cgroups of its name in every hierarchy); on cgroup v2 it is `CPUQuota=`
/// on the unit, which needs the `cpu` controller delegated to the sandbox.
pub struct Throttle {
    /// Where `cpu.stat` is.
    stat: PathBuf,
    /// How containerd's CPU was capped, in words.
    pub how: String,
}

const V1_CPU: &str = "/sys/fs/cgroup/cpu";

impl Throttle {
    /// Caps `pid` (containerd) at `percent` % of one CPU.
    pub fn apply(sandbox: &Sandbox, pid: u32, percent: u32) -> Result<Throttle, String> {
        let period_us = 100_000u64;
        let quota_us = period_us * u64::from(percent) / 100;
        let v1 = Path::new(V1_CPU);
        if v1.join("cpu.cfs_quota_us").exists() {
            let name = sandbox
                .dir()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dir = v1.join(name);
            let write = |file: &str, value: String| {
                fs::write(dir.join(file), &value).map_err(|e| {
                    format!(
                        "could not write {value} to {}: {e}",
                        dir.join(file).display()
                    )
                })
            };
            fs::create_dir_all(&dir)
                .map_err(|e| format!("could not create {}: {e}", dir.display()))?;
            let throttle = Throttle {
                stat: dir.join("cpu.stat"),
                how: format!(
                    "cgroup v1 {}: cpu.cfs_quota_us={quota_us} per cpu.cfs_period_us={period_us} ({percent} % of one CPU)",
                    dir.display()
                ),
            };
            write("cpu.cfs_period_us", period_us.to_string())?;
            write("cpu.cfs_quota_us", quota_us.to_string())?;
            write("cgroup.procs", pid.to_string())?;
            return Ok(throttle);
        }
        sandbox
            .systemctl(&[
                "set-property",
                "--runtime",
                sandbox.unit(),
                &format!("CPUQuota={percent}%"),
            ])
            .map_err(|e| e.to_string())?;
        let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .ok_or("containerd is in no cgroup v2 cgroup")?;
        let dir = Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'));
        let max = fs::read_to_string(dir.join("cpu.max")).unwrap_or_default();
        if !max.starts_with(&quota_us.to_string()) {
            return Err(format!(
                "CPUQuota={percent}% did not reach {}/cpu.max (it reads `{}`): the cpu controller is not delegated to the sandbox's user manager; enable it in the parent's cgroup.subtree_control",
                dir.display(),
                max.trim()
            ));
        }
        Ok(Throttle {
            stat: dir.join("cpu.stat"),
            how: format!(
                "CPUQuota={percent}% on the unit ({}/cpu.max: {})",
                dir.display(),
                max.trim()
            ),
        })
    }

    /// `(periods, throttled periods)` so far.
    pub fn periods(&self) -> Option<(u64, u64)> {
        let stat = fs::read_to_string(&self.stat).ok()?;
        let field = |key: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
        };
        Some((field("nr_periods ")?, field("nr_throttled ")?))
    }
}
