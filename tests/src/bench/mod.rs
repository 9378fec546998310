//! The measurements behind `cargo xtask bench` and `cargo xtask soak`, as library code so the
//! smoke test (`tests/tests/bench_smoke.rs`) runs the very same code on a small plan.
//!
//! - [`recovery`]: faults (crash, freeze, a wedged stop) injected into a fresh sandbox per
//!   trial, timed from the fault to the observer's verdict and to a new containerd answering
//!   `Version()`, for each [`Config`] (fused, polling-only, a Gardener-like reference);
//! - [`cost`]: the agent's CPU and memory at rest and under a connection storm, its eBPF
//!   programs' run counts and times, and the slowdown it causes on unrelated work;
//! - [`soak`]: a throttled, loaded containerd watched for a long time: no restart may happen;
//! - [`load`]: the load both put on the node, and the workloads whose slowdown is measured;
//! - [`switch`]: what the blocked-thread program on `sched_switch` costs every context switch;
//! - [`zoo`]: the fault zoo (OOM kill, cgroup freeze, descriptor exhaustion, a removed
//!   socket, and the faults above) against the observer's configurations and two reference
//!   watchdogs (Gardener-like, node-problem-detector-like).
//!
//! [`run`] carries out a [`BenchPlan`] and returns [`BenchResults`], which serialise to the
//! JSON file that `cargo xtask bench` writes and hold every figure of `BENCHMARKS.md`.

pub mod cost;
pub mod load;
pub mod procfs;
pub mod recovery;
pub mod soak;
pub mod switch;
pub mod zoo;

use std::{
    fs,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

pub use cost::{CostWindow, Load, Slowdown};
pub use recovery::{Config, Scenario, TrialResult};
pub use zoo::{Fault, Watchdog, ZooTrial};

/// What one `cargo xtask bench` run measures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchPlan {
    /// Trials per scenario for the fused and the polling-only configurations.
    pub trials: usize,
    /// Trials per scenario for the Gardener-like reference (each takes over a minute; they
    /// run in parallel sandboxes). 0 leaves the reference out.
    pub reference_trials: usize,
    pub scenarios: Vec<Scenario>,
    /// Configurations measured `trials` times (the reference is separate).
    pub configs: Vec<Config>,
    /// Length of the at-rest cost window.
    #[serde(serialize_with = "secs")]
    pub rest: Duration,
    /// Length of the connection-storm cost window.
    #[serde(serialize_with = "secs")]
    pub storm: Duration,
    /// Length of the connection-flood window.
    #[serde(serialize_with = "secs")]
    pub flood: Duration,
    /// Time between the agent turning healthy and a cost window: startup (BTF parsing,
    /// program loading) is not "at rest".
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    /// Rounds of the slowdown measurement, each with and without the agent.
    pub slowdown_rounds: usize,
    /// The zoo's faults; empty leaves the zoo out.
    pub faults: Vec<Fault>,
    /// Zoo trials per fault for the fused and polling-only observer.
    pub zoo_trials: usize,
    /// Zoo trials per fault for each reference watchdog (Gardener-like, NPD-like: minutes
    /// each, run in parallel sandboxes). 0 leaves them out.
    pub zoo_reference_trials: usize,
    /// Only the zoo: no recovery trials, cost windows or slowdown.
    pub zoo_only: bool,
    /// Length of one workload sample within a round.
    #[serde(serialize_with = "secs")]
    pub slowdown_sample: Duration,
}

impl BenchPlan {
    /// The full run behind `BENCHMARKS.md`: about 15 minutes on 2 cores.
    pub fn full(trials: usize) -> Self {
        BenchPlan {
            trials,
            reference_trials: 2,
            scenarios: Scenario::ALL.to_vec(),
            configs: vec![Config::Fused, Config::PollingOnly],
            rest: Duration::from_secs(60),
            storm: Duration::from_secs(30),
            flood: Duration::from_secs(15),
            warmup: Duration::from_secs(5),
            slowdown_rounds: 10,
            slowdown_sample: Duration::from_secs(1),
            faults: Fault::ALL.to_vec(),
            zoo_trials: 2,
            zoo_reference_trials: 1,
            zoo_only: false,
        }
    }

    /// A check that everything runs, in about a minute: one trial each, no reference,
    /// short windows. Its figures are not worth quoting.
    pub fn quick() -> Self {
        BenchPlan {
            trials: 1,
            reference_trials: 0,
            scenarios: Scenario::ALL.to_vec(),
            configs: vec![Config::Fused, Config::PollingOnly],
            rest: Duration::from_secs(3),
            storm: Duration::from_secs(3),
            flood: Duration::from_secs(3),
            warmup: Duration::from_secs(1),
            slowdown_rounds: 1,
            slowdown_sample: Duration::from_millis(300),
            faults: Fault::ALL.to_vec(),
            zoo_trials: 1,
            zoo_reference_trials: 0,
            zoo_only: false,
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResults {
    pub machine: Machine,
    pub plan: BenchPlan,
    /// Wall-clock start, RFC 3339.
    pub started_at: String,
    pub wall_s: f64,
    pub trials: Vec<TrialResult>,
    pub recovery: Vec<recovery::RecoveryRow>,
    pub ratios: Vec<recovery::RatioRow>,
    pub cost: Vec<CostWindow>,
    pub slowdown: Option<Slowdown>,
    pub aims: Vec<AimCheck>,
    pub zoo_trials: Vec<ZooTrial>,
    pub zoo: Vec<zoo::ZooRow>,
}

/// Carries out `plan`, reporting progress through `progress`, one line at a time. A trial or
/// window that fails is recorded with its error and the run goes on.
pub fn run(plan: &BenchPlan, progress: &mut dyn FnMut(&str)) -> BenchResults {
    let started = Instant::now();
    let started_at = rfc3339(SystemTime::now());
    let mut trials = Vec::new();
    let zoo_trials = run_zoo(plan, progress);
    let zoo = zoo::summarize_zoo(&zoo_trials);
    if plan.zoo_only {
        return BenchResults {
            machine: Machine::this(),
            plan: plan.clone(),
            started_at,
            wall_s: started.elapsed().as_secs_f64(),
            trials,
            recovery: Vec::new(),
            ratios: Vec::new(),
            cost: Vec::new(),
            slowdown: None,
            aims: Vec::new(),
            zoo_trials,
            zoo,
        };
    }

    let fast = plan.trials * plan.scenarios.len() * plan.configs.len();
    for trial in 0..plan.trials {
        for &scenario in &plan.scenarios {
            // Alternate which configuration goes first, so drift on a shared machine does
            // not favour one of them.
            let mut configs = plan.configs.clone();
            if trial % 2 == 1 {
                configs.reverse();
            }
            for config in configs {
                let result = recovery::run_trial(scenario, config, trial);
                progress(&format!(
                    "[{}/{fast}] {}",
                    trials.len() + 1,
                    result.one_line()
                ));
                trials.push(result);
            }
        }
    }

    if plan.reference_trials > 0 {
        progress(&format!(
            "Gardener-like reference: {} trial(s) of each scenario in parallel sandboxes (each takes 1-2 min)",
            plan.reference_trials
        ));
        let handles: Vec<_> = plan
            .scenarios
            .iter()
            .flat_map(|&scenario| (0..plan.reference_trials).map(move |trial| (scenario, trial)))
            .enumerate()
            .map(|(i, (scenario, trial))| {
                thread::spawn(move || {
                    // Staggered, so the sandboxes do not all start at once.
                    thread::sleep(Duration::from_millis(700) * i as u32);
                    recovery::run_trial(scenario, Config::GardenerLike, trial)
                })
            })
            .collect();
        for handle in handles {
            let result = handle.join().unwrap_or_else(|_| TrialResult::panicked());
            progress(&result.one_line());
            trials.push(result);
        }
    }

    let mut cost = Vec::new();
    for config in [Config::Fused, Config::PollingOnly] {
        for (load, window) in [
            (Load::Rest, plan.rest),
            (Load::Storm, plan.storm),
            (Load::Flood, plan.flood),
        ] {
            progress(&format!(
                "cost: {} {} for {:.0} s",
                config.label(),
                load.label(),
                window.as_secs_f64()
            ));
            let result = cost::measure_window(config, load, window, plan.warmup);
            progress(&format!("  {}", result.one_line()));
            cost.push(result);
        }
    }

    progress(&format!(
        "slowdown of unrelated work: {} round(s), each without the agent, with the fused agent and with the polling-only agent",
        plan.slowdown_rounds
    ));
    let slowdown = match cost::measure_slowdown(plan.slowdown_rounds, plan.slowdown_sample) {
        Ok(slowdown) => {
            for workload in &slowdown.workloads {
                progress(&format!("  {}", workload.one_line()));
            }
            Some(slowdown)
        }
        Err(err) => {
            progress(&format!("  slowdown not measured: {err}"));
            None
        }
    };

    let recovery = recovery::summarize_trials(&trials);
    let ratios = recovery::ratios(&recovery);
    let aims = aims(&recovery, &ratios, &cost, slowdown.as_ref());
    BenchResults {
        machine: Machine::this(),
        plan: plan.clone(),
        started_at,
        wall_s: started.elapsed().as_secs_f64(),
        trials,
        recovery,
        ratios,
        cost,
        slowdown,
        aims,
        zoo_trials,
        zoo,
    }
}

/// How many reference trials run at once: each is a sandbox with containerd and its CRI
/// plugin, mostly waiting; two dozen starting together on 2 cores made a start time out.
const REFERENCE_SANDBOXES: usize = 10;

/// The zoo: the fast watchdogs one trial at a time, then the references in parallel
/// sandboxes, [`REFERENCE_SANDBOXES`] at a time (each takes 2-4 minutes, mostly waiting).
fn run_zoo(plan: &BenchPlan, progress: &mut dyn FnMut(&str)) -> Vec<ZooTrial> {
    let mut out = Vec::new();
    let fast: Vec<Watchdog> = Watchdog::ALL
        .into_iter()
        .filter(|w| !w.is_reference())
        .collect();
    let total = plan.zoo_trials * plan.faults.len() * fast.len();
    for trial in 0..plan.zoo_trials {
        for &fault in &plan.faults {
            let mut order = fast.clone();
            if trial % 2 == 1 {
                order.reverse();
            }
            for watchdog in order {
                let result = zoo::run_trial(fault, watchdog, trial);
                progress(&format!(
                    "zoo [{}/{total}] {}",
                    out.len() + 1,
                    result.one_line()
                ));
                out.push(result);
            }
        }
    }
    if plan.zoo_reference_trials == 0 || plan.faults.is_empty() {
        return out;
    }
    progress(&format!(
        "zoo references: {} trial(s) of each fault for the Gardener-like and the NPD-like watchdog, in parallel sandboxes, {REFERENCE_SANDBOXES} at a time (2-4 min each)",
        plan.zoo_reference_trials
    ));
    let queue: Vec<(Fault, Watchdog, usize)> = Watchdog::ALL
        .into_iter()
        .filter(|w| w.is_reference())
        .flat_map(|watchdog| plan.faults.iter().map(move |&fault| (fault, watchdog)))
        .flat_map(|(fault, watchdog)| {
            (0..plan.zoo_reference_trials).map(move |trial| (fault, watchdog, trial))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for worker in 0..REFERENCE_SANDBOXES.min(queue.len()) {
            let (queue, next, results) = (&queue, &next, &results);
            scope.spawn(move || {
                // Staggered, so the first sandboxes do not all start at once.
                thread::sleep(Duration::from_millis(700) * worker as u32);
                while let Some(&(fault, watchdog, trial)) =
                    queue.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    let result =
                        std::panic::catch_unwind(|| zoo::run_trial(fault, watchdog, trial))
                            .unwrap_or_else(|_| ZooTrial {
                                error: Some("the trial panicked".into()),
                                ..ZooTrial::empty(fault, watchdog, trial)
                            });
                    if let Ok(mut results) = results.lock() {
                        results.push(result);
                    }
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    // In the queue's order, whatever order they finished in.
    results.sort_by_key(|t| {
        queue
            .iter()
            .position(|&(f, w, n)| (f, w, n) == (t.fault, t.watchdog, t.trial))
    });
    for result in results {
        progress(&format!("zoo {}", result.one_line()));
        out.push(result);
    }
    out
}

/// One of the project's aims, and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct AimCheck {
    pub aim: String,
    pub measured: String,
    /// `None` when this run did not measure it.
    pub met: Option<bool>,
}

fn aims(
    recovery: &[recovery::RecoveryRow],
    ratios: &[recovery::RatioRow],
    cost: &[CostWindow],
    slowdown: Option<&Slowdown>,
) -> Vec<AimCheck> {
    let answered = |scenario: Scenario, config: Config| {
        recovery
            .iter()
            .find(|row| row.scenario == scenario && row.config == config)
            .and_then(|row| row.fault_to_answer_ms)
    };
    let mut checks = Vec::new();
    let check =
        |aim: &str, measured: Option<(f64, String)>, met: &dyn Fn(f64) -> bool| match measured {
            Some((value, text)) => AimCheck {
                aim: aim.to_owned(),
                measured: text,
                met: Some(met(value)),
            },
            None => AimCheck {
                aim: aim.to_owned(),
                measured: "not measured".to_owned(),
                met: None,
            },
        };
    let ms = |s: Option<Summary>| {
        s.map(|s| {
            (
                s.median,
                format!(
                    "median {:.0} ms, max {:.0} ms (fused, fault to Version() answered)",
                    s.median, s.max
                ),
            )
        })
    };
    checks.push(check(
        "crash recovered in under 0.5 s",
        ms(answered(Scenario::Crash, Config::Fused)),
        &|v| v < 500.0,
    ));
    checks.push(check(
        "freeze recovered in under 2 s",
        ms(answered(Scenario::Freeze, Config::Fused)),
        &|v| v < 2000.0,
    ));
    let freeze_ratio = ratios
        .iter()
        .find(|r| r.scenario == Scenario::Freeze && r.config == Config::PollingOnly)
        .and_then(|r| r.answer_ratio);
    checks.push(check(
        "freeze recovered at least 3 times faster than polling-only",
        freeze_ratio.map(|r| {
            (
                r,
                format!("{r:.2}x (median polling-only / median fused, fault to answer)"),
            )
        }),
        &|v| v >= 3.0,
    ));
    let window = |load: Load| {
        cost.iter()
            .find(|c| c.config == Config::Fused && c.load == load && c.error.is_none())
    };
    checks.push(check(
        "idle CPU under 0.5 %",
        window(Load::Rest).map(|c| {
            (
                c.cpu_percent,
                format!(
                    "{:.3} % of one CPU over {:.0} s (fused, at rest); eBPF programs add {:.3} % in the context of the tasks that trigger them",
                    c.cpu_percent, c.seconds, c.bpf_cpu_percent
                ),
            )
        }),
        &|v| v < 0.5,
    ));
    let peak = cost
        .iter()
        .filter(|c| c.config == Config::Fused && c.error.is_none())
        .map(|c| c.vm_hwm_mib)
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.max(v)))
        });
    checks.push(check(
        "under 32 MiB",
        peak.map(|p| (p, format!("peak VmHWM {p:.1} MiB (fused)"))),
        &|v| v < 32.0,
    ));
    for workload in slowdown.map(|s| s.workloads.as_slice()).unwrap_or_default() {
        let aim = format!("under 5 % slowdown of unrelated work: {}", workload.name);
        let (Some(fused), Some(control)) = (workload.fused_ratio, workload.polling_ratio) else {
            checks.push(check(&aim, None, &|_| false));
            continue;
        };
        let without = summarize(&workload.without_ns).map_or(f64::NAN, |s| s.median);
        let bpf = workload.fused_bpf_ns.map_or(f64::NAN, |s| s.median);
        let measured = format!(
            "{:+.1} % (median of {} per-round ratios, fused / without); the fused agent's eBPF \
             programs ran {bpf:.0} ns per operation ({:.1} % of {without:.0} ns); the control \
             (polling-only, no hooks) read {:+.1} %",
            (fused.median - 1.0) * 100.0,
            fused.n,
            bpf / without * 100.0,
            (control.median - 1.0) * 100.0,
        );
        // A control that moves by more than the aim means the machine's noise is larger
        // than what is measured.
        checks.push(AimCheck {
            aim,
            met: ((control.median - 1.0).abs() < 0.03).then_some(fused.median < 1.05),
            measured: if (control.median - 1.0).abs() < 0.03 {
                measured
            } else {
                format!("inconclusive: {measured}")
            },
        });
    }
    checks
}

/// Median, percentiles and extremes of a sample. Percentiles are nearest-rank: with 5 values
/// the p95 is the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// The [`Summary`] of `values`; `None` when there are none. NaNs are left out.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let rank = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some(Summary {
        n,
        min: sorted[0],
        median,
        p95: rank(0.95),
        p99: rank(0.99),
        max: sorted[n - 1],
        mean: sorted.iter().sum::<f64>() / n as f64,
    })
}

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub containerd: String,
    pub observer_bin: String,
}

impl Machine {
    pub fn this() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let containerd = Command::new("containerd")
            .arg("--version")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_else(|err| format!("unknown ({err})"));
        Machine {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            cpus: thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned()),
            memory_mib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib / 1024),
            containerd,
            observer_bin: crate::observer_bin()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|err| err.to_string()),
        }
    }
}

pub(crate) fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `2026-01-02T03:04:05.678901Z`, as the observer writes its times.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Parses the observer's RFC 3339 times.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// Milliseconds from `earlier` to `later` on the wall clock, negative when `later` is earlier.
pub(crate) fn wall_ms(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let s = summarize(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.min, s.median, s.p95, s.max), (1.0, 3.0, 5.0, 5.0));
        let s = summarize(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn rfc3339_round_trips_the_observers_format() {
        let text = "2026-11-28T04:06:56.834110Z";
        let t = parse_rfc3339(text).unwrap();
        assert_eq!(rfc3339(t), text);
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
